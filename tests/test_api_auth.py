"""Users against a real uvicorn: named tokens, ownership, admin override, public and private reads, no CSRF, and
a first start that generates (and prints once) the admin token, as `docker compose up service` does."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    REPO_ROOT,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    service_data,
    set_fake_behaviour,
    tiny_artifact,
    upload,
    wait_for_status,
)

ALICE, BOB, ROOT = "alice-token-0123456789", "bob-token-0123456789", "root-token-0123456789"
SLOW = {"chunks": 400, "chunk_seconds": 0.05}
TERMINAL = {"completed", "failed", "timeout", "cancelled"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def users_env(script: Path, reads: str) -> dict[str, str]:
    return {**fake_evaluator_env(script), "PGOLF_TOKENS": f"alice:{ALICE},bob:{BOB},root:{ROOT}",
            "PGOLF_ADMINS": "root", "PGOLF_READS": reads, "PGOLF_API_TOKEN": "", "PGOLF_QUEUE_BOUND": "4"}


@pytest.fixture(scope="module", params=["public", "private"])
def users(request: pytest.FixtureRequest, service_data: ServiceData,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path, str]]:
    root = tmp_path_factory.mktemp(f"users-{request.param}")
    script = root / "behaviour.json"
    with ServiceProcess(root / "storage", service_data, **users_env(script, request.param)) as process:
        yield process, script, request.param


def test_owner_cancels_others_may_not_admin_may(users: tuple[ServiceProcess, Path, str], tiny_artifact: Path) -> None:  # noqa: F811
    process, script, reads = users
    set_fake_behaviour(script, **SLOW)
    with httpx.Client(base_url=process.url, timeout=60) as client:
        mine = upload(client, tiny_artifact, params={"wait": "false", "force": "true"}, headers=bearer(ALICE))
        assert mine.status_code == 202
        job_id = mine.json()["id"]
        queued = upload(client, tiny_artifact, params={"wait": "false", "force": "true"}, headers=bearer(ALICE))
        queued_id = queued.json()["id"]
        job = client.get(f"/evaluations/{job_id}", headers=bearer(ALICE)).json()
        assert job["owner"] == "alice"

        by_bob = client.delete(f"/evaluations/{job_id}", headers=bearer(BOB))
        if reads == "public":
            assert (by_bob.status_code, by_bob.json()["code"]) == (403, "not_owner")
        else:  # bob cannot even see alice's job
            assert (by_bob.status_code, by_bob.json()["code"]) == (404, "not_found")
        assert client.get(f"/evaluations/{job_id}", headers=bearer(ALICE)).json()["status"] in ("queued", "running")

        by_owner = client.delete(f"/evaluations/{queued_id}", headers=bearer(ALICE))
        assert (by_owner.status_code, by_owner.json()["status"]) == (200, "cancelled")
        by_admin = client.delete(f"/evaluations/{job_id}", headers=bearer(ROOT))
        assert (by_admin.status_code, by_admin.json()["status"]) == (200, "cancelled")


def test_missing_or_wrong_tokens_are_refused(users: tuple[ServiceProcess, Path, str], tiny_artifact: Path) -> None:  # noqa: F811
    process, _script, reads = users
    with httpx.Client(base_url=process.url, timeout=60) as client:
        for headers in ({}, bearer("not-a-token-of-anyone"), {"Authorization": ALICE}, {"Authorization": "Basic x"}):
            response = upload(client, tiny_artifact, headers=headers)
            assert (response.status_code, response.json()["code"]) == (401, "unauthorized"), headers
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.delete("/evaluations/anything").status_code == 401
        assert client.get("/evaluations", headers=bearer("wrong-token-0123456789")).status_code == 401
        assert client.get("/whoami").status_code == 401
        assert client.get("/whoami", headers=bearer(ROOT)).json() == {"user": "root", "admin": True, "reads": reads}
        anonymous_list = client.get("/evaluations")
        assert anonymous_list.status_code == (200 if reads == "public" else 401)
        limits = client.get("/limits").json()
        assert limits["auth_required"] is True and limits["reads"] == reads


def test_reads_of_others_jobs_follow_the_policy(users: tuple[ServiceProcess, Path, str], tiny_artifact: Path) -> None:  # noqa: F811
    process, script, reads = users
    set_fake_behaviour(script, chunks=2, chunk_seconds=0.05)
    with httpx.Client(base_url=process.url, timeout=60) as client:
        job_id = upload(client, tiny_artifact, params={"wait": "false", "force": "true"},
                        headers=bearer(ALICE)).json()["id"]
        wait_for_status(client, job_id, TERMINAL) if reads == "public" else None
        for path in (f"/evaluations/{job_id}", f"/evaluations/{job_id}/events"):
            by_bob = client.get(path, headers=bearer(BOB))
            assert by_bob.status_code == (200 if reads == "public" else 404), path
            assert client.get(path, headers=bearer(ALICE)).status_code == 200
            assert client.get(path, headers=bearer(ROOT)).status_code == 200
        bobs_list = {job["id"] for job in client.get("/evaluations", headers=bearer(BOB)).json()}
        assert (job_id in bobs_list) == (reads == "public")
        assert job_id in {job["id"] for job in client.get("/evaluations", headers=bearer(ROOT)).json()}
        mine = client.get("/evaluations", params={"mine": "true"}, headers=bearer(BOB)).json()
        assert all(job["owner"] == "bob" for job in mine)
        # The same artifact from bob: with public reads he gets alice's finished job, with private reads his own.
        again = upload(client, tiny_artifact, params={"wait": "false"}, headers=bearer(BOB)).json()
        assert (again["id"] == job_id) == (reads == "public")
        wait_for_status(client, again["id"], TERMINAL) if reads == "public" else None


def test_a_cross_site_form_post_is_refused_and_nothing_is_queued(
    users: tuple[ServiceProcess, Path, str], tiny_artifact: Path  # noqa: F811
) -> None:
    process, _script, _reads = users
    with httpx.Client(base_url=process.url, timeout=60) as client:
        before = client.get("/evaluations", headers=bearer(ROOT)).json()
        # What a browser sends for <form method=post enctype=multipart/form-data action=http://service/evaluate>
        # on another site: no Authorization (there are no cookies to ride on), an Origin and Sec-Fetch-Site.
        browser = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        forged = upload(client, tiny_artifact, headers=browser)
        assert forged.status_code in (401, 403) and set(forged.json()) == {"code", "message"}
        # Even a client that somehow has a token cannot write from another origin.
        with_token = upload(client, tiny_artifact, headers={"Origin": "http://evil.example", **bearer(ALICE)})
        assert (with_token.status_code, with_token.json()["code"]) == (403, "cross_origin")
        same_origin = upload(client, tiny_artifact, params={"wait": "false"},
                             headers={"Origin": process.url, **bearer(ROOT)})
        assert same_origin.status_code in (200, 202)
        assert "set-cookie" not in forged.headers and "access-control-allow-origin" not in forged.headers
        after = client.get("/evaluations", headers=bearer(ROOT)).json()
        assert len(after) <= len(before) + 1  # only the same-origin upload (or its reuse)


def _compose_service_env(storage: Path, data: ServiceData, port: int) -> dict[str, str]:
    """The environment `docker compose up service-cpu` gives the service, with this machine's paths."""
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    env: dict[str, str] = {"HOME": os.environ.get("HOME", "/root")}
    for name, value in compose["services"]["service-cpu"]["environment"].items():
        if value is None:
            continue  # passed through from the shell, which sets none of them here
        env[name] = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), str(value))
    env.update(PATH=os.environ["PATH"], PGOLF_HOST="127.0.0.1", PGOLF_PORT=str(port), PGOLF_STORAGE_DIR=str(storage),
               PGOLF_DATA_DIR=str(data.data_dir), PGOLF_TOKENIZER=str(data.tokenizer))
    return env


def test_the_compose_service_starts_with_auth_on_and_prints_its_generated_token_once(
    service_data: ServiceData, tiny_artifact: Path, tmp_path: Path  # noqa: F811
) -> None:
    storage = tmp_path / "storage"
    first = ServiceProcess(storage, service_data)
    first.env = _compose_service_env(storage, service_data, first.port)
    assert "PGOLF_API_TOKEN" not in first.env and "PGOLF_TOKENS" not in first.env
    with first, httpx.Client(base_url=first.url, timeout=60) as client:
        tokens = re.findall(r"PGOLF_TOKEN=(\S+)", first.log())
        assert len(tokens) == 1
        token = tokens[0]
        assert upload(client, tiny_artifact).status_code == 401
        assert client.get("/whoami", headers=bearer(token)).json()["user"] == "admin"
    stored = (storage / "tokens").read_text()
    assert token not in stored and hashlib.sha256(token.encode()).hexdigest() in stored  # hashed at rest
    assert (storage / "tokens").stat().st_mode & 0o077 == 0

    second = ServiceProcess(storage, service_data)
    second.env = {**_compose_service_env(storage, service_data, second.port)}
    second.log_path = tmp_path / "second.log"
    with second, httpx.Client(base_url=second.url, timeout=60) as client:
        assert "PGOLF_TOKEN=" not in second.log()  # printed once, at the first start only
        assert client.get("/whoami", headers=bearer(token)).status_code == 200


def test_token_command_appends_a_hashed_line_the_service_accepts(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    result = subprocess.run([sys.executable, "-m", "service", "token", "carol", "--file", str(tokens)],
                            capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    token = result.stdout.strip().splitlines()[-1]
    assert tokens.read_text() == f"carol:sha256:{hashlib.sha256(token.encode()).hexdigest()}\n"
    from service.api.auth import UserDirectory
    from service.api.settings import Settings

    settings = Settings(data_dir=tmp_path, tokenizer=tmp_path, storage_dir=tmp_path, tokens_file=tokens)
    users = UserDirectory.load(settings, announce=lambda message: pytest.fail(f"nothing to generate: {message}"))
    assert users.authenticate(token).name == "carol"  # type: ignore[union-attr]
    assert users.authenticate(token + "x") is None
    tokens.write_text("carol:plaintext-token\n")
    from service.api.settings import SettingsError

    with pytest.raises(SettingsError, match="sha256"):
        UserDirectory.load(settings, announce=print)
