"""Settings come from the environment, typed, with the challenge's limits as defaults; bad values fail fast."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from service.api.settings import Settings, SettingsError


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "fineweb_val_000000.bin").write_bytes(b"")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    return tmp_path


def test_defaults_are_the_challenge_limits(data_dir: Path) -> None:
    settings = Settings.from_env({"PGOLF_DATA_DIR": str(data_dir)})
    assert settings.max_artifact_bytes == 16_000_000
    assert settings.eval_limit_seconds == 600.0
    assert settings.workers == 1
    assert settings.api_token is None
    assert settings.tokenizer == data_dir / "tokenizer.model"
    assert settings.evaluator_command == (sys.executable, "-m", "service", "evaluate")
    assert settings.evaluator_extra_args == ()


def test_every_variable_is_read(data_dir: Path, tmp_path: Path) -> None:
    tokenizer = tmp_path / "other.model"
    tokenizer.write_bytes(b"")
    settings = Settings.from_env({
        "PGOLF_DATA_DIR": str(data_dir), "PGOLF_TOKENIZER": str(tokenizer),
        "PGOLF_STORAGE_DIR": str(tmp_path / "store"), "PGOLF_MAX_ARTIFACT_BYTES": "1_000",
        "PGOLF_EVAL_LIMIT_SECONDS": "12.5", "PGOLF_KILL_GRACE_SECONDS": "0", "PGOLF_WORKERS": "2",
        "PGOLF_QUEUE_BOUND": "0", "PGOLF_API_TOKEN": "s3cret-admin-token", "PGOLF_HOST": "0.0.0.0",
        "PGOLF_PORT": "9000", "PGOLF_EVALUATOR": "docker run --rm img python -m service evaluate",
        "PGOLF_EVAL_ARGS": "--device cuda --seq-len '2048'", "PGOLF_VALIDATION_TIMEOUT_SECONDS": "30",
        "PGOLF_HEADER_TIMEOUT_SECONDS": "3", "PGOLF_UPLOAD_IDLE_SECONDS": "4",
        "PGOLF_UPLOAD_MIN_BYTES_PER_SECOND": "1000", "PGOLF_UPLOAD_DEADLINE_SECONDS": "60",
        "PGOLF_UPLOADS_PER_CLIENT": "3", "PGOLF_UPLOADS_IN_FLIGHT": "5", "PGOLF_FORWARDED_ALLOW_IPS": "10.0.0.1",
        "PGOLF_TOKENS": "alice:alice-token-0123456789, bob:bob-token-0123456789",
        "PGOLF_TOKENS_FILE": str(tmp_path / "tokens"), "PGOLF_ADMINS": "alice", "PGOLF_READS": "private",
        "PGOLF_SHUTDOWN_GRACE_SECONDS": "7", "PGOLF_STORAGE_RETRY_SECONDS": "2",
    })
    assert settings.tokenizer == tokenizer
    assert settings.database_path == tmp_path / "store" / "service.sqlite3"
    assert (settings.max_artifact_bytes, settings.eval_limit_seconds, settings.kill_grace_seconds) == (1000, 12.5, 0)
    assert (settings.workers, settings.queue_bound, settings.api_token) == (2, 0, "s3cret-admin-token")
    assert (settings.host, settings.port, settings.validation_timeout_seconds) == ("0.0.0.0", 9000, 30.0)
    assert settings.evaluator_command[:3] == ("docker", "run", "--rm")
    assert settings.evaluator_extra_args == ("--device", "cuda", "--seq-len", "2048")
    assert (settings.header_timeout_seconds, settings.upload_idle_seconds, settings.upload_min_bytes_per_second,
            settings.upload_deadline_seconds) == (3.0, 4.0, 1000, 60.0)
    assert (settings.uploads_per_client, settings.uploads_in_flight, settings.forwarded_allow_ips) == (3, 5, "10.0.0.1")
    assert settings.user_tokens == (("alice", "alice-token-0123456789"), ("bob", "bob-token-0123456789"))
    assert (settings.token_file_path, settings.admins, settings.reads) == (tmp_path / "tokens", ("alice",), "private")
    assert (settings.shutdown_grace_seconds, settings.storage_retry_seconds) == (7.0, 2.0)


def test_defaults_of_admission_and_users_are_sized_for_a_public_server(data_dir: Path) -> None:
    settings = Settings.from_env({"PGOLF_DATA_DIR": str(data_dir)})
    # A 16 MB artifact at the minimum rate fits well inside the deadline.
    assert 16_000_000 / settings.upload_min_bytes_per_second < settings.upload_deadline_seconds / 1.5
    assert (settings.uploads_per_client, settings.uploads_in_flight) == (2, 16)
    assert (settings.reads, settings.admins, settings.user_tokens) == ("public", ("admin",), ())
    assert settings.token_file_path == settings.storage_dir / "tokens"


def test_a_cluster_api_node_runs_no_workers_and_leases_are_configurable(data_dir: Path) -> None:
    defaults = Settings.from_env({"PGOLF_DATA_DIR": str(data_dir)})
    assert (defaults.workers, defaults.lease_seconds, defaults.requeue_lost_jobs) == (1, 30.0, 0)
    settings = Settings.from_env({"PGOLF_DATA_DIR": str(data_dir), "PGOLF_WORKERS": "0",
                                  "PGOLF_LEASE_SECONDS": "4.5", "PGOLF_REQUEUE_LOST_JOBS": "1"})
    assert (settings.workers, settings.lease_seconds, settings.requeue_lost_jobs) == (0, 4.5, 1)
    # An API node evaluates nothing: the tokenizer is enough, the validation shards live on the workers.
    (data_dir / "fineweb_val_000000.bin").unlink()
    with pytest.raises(SettingsError, match="validation shard"):
        Settings.from_env({"PGOLF_DATA_DIR": str(data_dir)})
    assert Settings.from_env({"PGOLF_DATA_DIR": str(data_dir), "PGOLF_WORKERS": "0"}).workers == 0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PGOLF_WORKERS", "-1", "at least 0"),
        ("PGOLF_LEASE_SECONDS", "0.5", "at least 1"),
        ("PGOLF_REQUEUE_LOST_JOBS", "once", "not an integer"),
        ("PGOLF_WORKERS", "two", "not an integer"),
        ("PGOLF_EVAL_LIMIT_SECONDS", "nan", "at least"),
        ("PGOLF_MAX_ARTIFACT_BYTES", "-1", "at least 1"),
        ("PGOLF_API_TOKEN", "short", "at least 16 characters"),
        ("PGOLF_TOKENS", "alice", "user:token"),
        ("PGOLF_TOKENS", "al ice:0123456789abcdefgh", "user:token"),
        ("PGOLF_TOKENS", "a:0123456789abcdefgh,a:0123456789abcdefgi", "twice"),
        ("PGOLF_READS", "everyone", "public, private"),
        ("PGOLF_ADMINS", "root;x", "not a user name"),
    ],
)
def test_malformed_values_are_refused(data_dir: Path, name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"PGOLF_DATA_DIR": str(data_dir), name: value})


def test_missing_data_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="PGOLF_DATA_DIR must be set"):
        Settings.from_env({})
    with pytest.raises(SettingsError, match="no \\*_val_\\*.bin"):
        Settings.from_env({"PGOLF_DATA_DIR": str(tmp_path)})
    (tmp_path / "x_val_000000.bin").write_bytes(b"")
    with pytest.raises(SettingsError, match="tokenizer"):
        Settings.from_env({"PGOLF_DATA_DIR": str(tmp_path)})
