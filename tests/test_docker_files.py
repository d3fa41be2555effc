"""Static checks of the Docker files, plus the parts of docker/ that run without a Docker engine.

The images themselves are built and run by docker/smoke.sh (in CI: built beside the test suite, run after it).
Here: compose.yaml names the services and profiles the README promises, its command lines parse with the
project's real command lines, the Dockerfiles keep the pins and the non-root service, smoke.sh reports a skip (not
a pass) where no engine can be had, and the demo client uploads and follows an NDJSON stream.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML comes with huggingface_hub

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
GPU_SERVICES = {"data", "train", "service"}
DEMO_SERVICES = {"demo-data", "demo-train", "demo-service", "demo-client"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def pinned_torch_version() -> str:
    (version,) = re.findall(r'^\s*"torch==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return version


def command_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


# --- compose.yaml -------------------------------------------------------------------------------------------------


def test_compose_has_the_pipeline_services_and_the_demo_profile(compose: dict) -> None:
    services = compose["services"]
    assert GPU_SERVICES | DEMO_SERVICES <= set(services)
    for name in GPU_SERVICES:
        assert "profiles" not in services[name], f"`docker compose up {name}` must work without a profile"
    for name in DEMO_SERVICES:
        assert services[name]["profiles"] == ["demo"]
    # This machine has no bridge networks: every container shares the host's network.
    assert {s.get("network_mode") for s in services.values()} == {"host"}


def test_train_reserves_all_gpus_with_shared_memory_and_mounts(compose: dict) -> None:
    train = compose["services"]["train"]
    (request,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert request["driver"] == "nvidia" and request["count"] in ("all", 8) and "gpu" in request["capabilities"]
    size = re.fullmatch(r"(\d+)([kmg]b?)", str(train["shm_size"]).lower())
    assert size and size.group(2).startswith("g") and int(size.group(1)) >= 1
    assert {"./data:/data:ro", "./artifacts:/artifacts"} <= set(train["volumes"])
    assert train["depends_on"]["data"]["condition"] == "service_completed_successfully"
    assert "./data:/data" in compose["services"]["data"]["volumes"]


def test_train_passes_through_every_reference_override_the_trainer_reads(compose: dict) -> None:
    from trainer.config import ALL_FIELDS, ENV_ALIASES, UPSTREAM_ENV

    # Names with no effect whatever their value (UPSTREAM_ENV rules that accept anything) need not reach it.
    can_change_or_refuse = {name for name, rule in UPSTREAM_ENV.items() if rule.accepts is not None or rule.maps}
    read_by_trainer = {name.upper() for name in ALL_FIELDS} | set(ENV_ALIASES) | can_change_or_refuse
    environment = compose["services"]["train"]["environment"]
    missing = sorted(read_by_trainer - set(environment))
    assert not missing, f"compose.yaml does not pass through {missing}"
    # Passed through from the shell (no value here), never pinned to a value by the compose file.
    assert all(environment[name] is None for name in read_by_trainer)


def test_service_is_reachable_healthchecked_and_optionally_on_gpus(compose: dict) -> None:
    services = compose["services"]
    for name in ("service", "service-cpu", "demo-service"):
        service = services[name]
        assert "healthz" in " ".join(command_argv(service["healthcheck"]["test"]))
        assert "/data:ro" in " ".join(service["volumes"])
    assert services["service"]["environment"]["PGOLF_PORT"] == "${PGOLF_PORT:-8000}"
    assert "deploy" in services["service"] and "deploy" not in services["service-cpu"]
    assert services["service-cpu"]["profiles"] == ["cpu"]


def test_services_start_with_auth_on_and_the_demo_shares_one_token(compose: dict) -> None:
    services = compose["services"]
    for name in ("service", "service-cpu"):
        environment = services[name]["environment"]
        # Tokens only ever come from the shell; with none, the service generates one at its first start.
        for variable in ("PGOLF_API_TOKEN", "PGOLF_TOKENS", "PGOLF_READS", "PGOLF_ADMINS"):
            assert variable in environment and environment[variable] is None, (name, variable)
        assert "/var/lib/pgolf" in " ".join(services[name]["volumes"])  # the generated token's hash persists
    demo_token = services["demo-service"]["environment"]["PGOLF_API_TOKEN"]
    assert demo_token.startswith("${PGOLF_DEMO_TOKEN:-") and services["demo-service"]["environment"]["PGOLF_HOST"] \
        == "127.0.0.1"
    assert services["demo-client"]["environment"]["PGOLF_API_TOKEN"] == demo_token
    assert "PGOLF_DEMO_TOKEN=$(" in (DOCKER_DIR / "smoke.sh").read_text()  # the smoke run draws its own


def test_the_service_image_carries_no_token() -> None:
    instructions = dockerfile_instructions(DOCKER_DIR / "service.Dockerfile")
    environment = " ".join(args for instruction, args in instructions if instruction in ("ENV", "ARG"))
    # A token baked into a layer is a token for everyone with the image.
    assert not re.search(r"PGOLF_(API_)?TOKENS?(_FILE)?=", environment)
    assert "PGOLF_STORAGE_DIR=/var/lib/pgolf" in environment


def test_demo_runs_in_pipeline_order(compose: dict) -> None:
    services = compose["services"]
    assert services["demo-train"]["depends_on"] == {"demo-data": {"condition": "service_completed_successfully"}}
    assert services["demo-service"]["depends_on"] == {"demo-train": {"condition": "service_completed_successfully"}}
    assert services["demo-client"]["depends_on"] == {
        "demo-train": {"condition": "service_completed_successfully"},
        "demo-service": {"condition": "service_healthy"},
    }
    assert services["demo-train"]["environment"]["NPROC_PER_NODE"] == 1
    assert "deploy" not in services["demo-train"] and "deploy" not in services["demo-service"]


def test_compose_command_lines_parse_with_the_real_command_lines(compose: dict) -> None:
    from service.__main__ import build_parser as service_parser
    from trainer.cli import build_parser as trainer_parser

    services = compose["services"]
    download = command_argv(services["data"]["command"].replace("${TRAIN_SHARDS:-80}", "80"))
    assert download[:3] == ["python", "-m", "trainer"]
    args = trainer_parser().parse_args(download[3:])
    assert (args.command, args.variant, args.train_shards, args.out) == ("data", "sp1024", 80, "/data")
    embedded = command_argv(services["demo-data"]["command"])
    assert trainer_parser().parse_args(embedded[3:]).data_command == "build-embedded"
    engine_args = shlex.split(services["demo-service"]["environment"]["PGOLF_EVAL_ARGS"])
    evaluate = service_parser().parse_args(["evaluate", "model.pgolf", "--data", "/data", *engine_args])
    assert (evaluate.device, evaluate.seq_len) == ("cpu", 256)


def test_demo_client_runs_the_verifier_on_what_demo_train_writes(compose: dict) -> None:
    script = compose["services"]["demo-client"]["command"][-1]
    assert "/opt/pgolf/docker/demo_client.py" in script
    from verifier.__main__ import build_parser

    verify = shlex.split(script[script.index("python -m verifier check"):].replace("\\\n", " "))
    args = build_parser().parse_args(verify[3:])
    assert str(args.artifact) == "/artifacts/demo/model.pgolf"
    assert [p.name for p in args.train_log] == ["train.log", "summary.json"]
    assert args.eval_report.name == "eval-report.ndjson"
    assert compose["services"]["demo-train"]["environment"]["PGOLF_OUT_DIR"] == "/artifacts/demo"


CLUSTER_SERVICES = {"postgres", "api", "worker"}


def test_cluster_profile_has_postgres_api_nodes_and_gpu_workers(compose: dict) -> None:
    from service.__main__ import build_parser as service_parser

    services = compose["services"]
    for name in CLUSTER_SERVICES:
        assert services[name]["profiles"] == ["cluster"], name
    api, worker, postgres = services["api"], services["worker"], services["postgres"]
    assert api["environment"]["PGOLF_WORKERS"] == 0 and "postgresql://" in api["environment"]["PGOLF_DATABASE_URL"]
    assert api["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert "healthz" in " ".join(command_argv(api["healthcheck"]["test"]))
    (request,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert request["driver"] == "nvidia" and "gpu" in request["capabilities"]
    assert service_parser().parse_args(command_argv(worker["command"])[3:]).command == "worker"
    assert "depends_on" not in worker, "a worker runs on another host than the database"
    # Passed through from the shell (with the password in it), never written into the compose file.
    assert worker["environment"]["PGOLF_DATABASE_URL"] is None
    assert worker["healthcheck"] == {"disable": True} and "/data:ro" in " ".join(worker["volumes"])
    # Nothing shared but the database: each node its own storage volume.
    storage = {name: next(v for v in services[name]["volumes"] if v.endswith(":/var/lib/pgolf")) for name in
               ("api", "worker")}
    assert len(set(storage.values())) == 2
    assert postgres["build"]["dockerfile"] == "docker/postgres.Dockerfile"
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "${PGOLF_DB_PASSWORD:-}"


def test_compose_file_validates_with_every_profile() -> None:
    """`docker compose --profile cluster config` (or docker-compose's) with the variables a deployment sets, and
    with none: the default services must not need the cluster's."""
    for command in (["docker", "compose"], ["docker-compose"]):
        probe = subprocess.run([*command, "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            break
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    cluster_env = {"PGOLF_DB_PASSWORD": "x" * 16, "PGOLF_DATABASE_URL": "postgresql://pgolf:x@db:5432/pgolf"}
    for profile in ("demo", "cpu", "cluster"):
        for extra in ({}, cluster_env):
            result = subprocess.run([*command, "-f", str(REPO_ROOT / "compose.yaml"), "--profile", profile,
                                     "config", "-q"], capture_output=True, text=True, cwd=REPO_ROOT,
                                    env={**os.environ, **extra})
            assert result.returncode == 0, (profile, extra, result.stderr)


def test_postgres_image_is_debians_postgresql_on_any_debian_base() -> None:
    instructions = dockerfile_instructions(DOCKER_DIR / "postgres.Dockerfile")
    assert instructions[0] == ("ARG", "BASE_IMAGE=debian:bookworm-slim")  # or docker/smoke.sh's debootstrap base
    assert instructions[1] == ("FROM", "${BASE_IMAGE}")
    installs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "apt-get install" in installs and " postgresql" in installs
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users == ["postgres"] and any(i == "HEALTHCHECK" and "pg_isready" in a for i, a in instructions)


@pytest.fixture()
def postgres_owned_dir() -> Iterator[Path]:
    """A fresh directory the user `postgres` can use (pytest's own tmp_path is private to root)."""
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="pgolf-postgres-image-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postgres_image_entrypoint_creates_the_database_once_and_keeps_it(postgres_owned_dir: Path) -> None:
    """The image's start script, run here on Debian's PostgreSQL binaries as the image runs it (user postgres):
    the first start creates the role and database pgolf with the password, a restart reuses them."""
    import glob
    import pwd
    import socket
    import time

    psycopg = pytest.importorskip("psycopg")
    if not glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        pytest.skip("Debian's postgresql package is not installed (/usr/lib/postgresql/*/bin)")
    tmp_path = postgres_owned_dir
    run_as: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(tmp_path, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PATH": os.environ["PATH"], "PGDATA": str(tmp_path / "data"), "PGPORT": str(port),
           "POSTGRES_PASSWORD": "cluster-test-password", "PGOLF_DB_ALLOW": "127.0.0.1/32", "HOME": str(tmp_path)}
    url = f"postgresql://pgolf:cluster-test-password@127.0.0.1:{port}/pgolf"
    # A copy beside the data, as the image holds its own: user postgres may not be able to read the checkout
    # (a clone in a 0700 directory such as mktemp -d's).
    entrypoint = tmp_path / "postgres-entrypoint.sh"
    shutil.copyfile(DOCKER_DIR / "postgres-entrypoint.sh", entrypoint)
    refused = subprocess.run([*run_as, "sh", str(entrypoint)], capture_output=True,
                             text=True, env={**env, "POSTGRES_PASSWORD": ""}, cwd=tmp_path, timeout=30)
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr
    for start in ("first", "again"):
        server = subprocess.Popen([*run_as, "sh", str(entrypoint)], env=env,
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with psycopg.connect(url, connect_timeout=2) as connection:
                        assert connection.execute("SELECT current_user, current_database()").fetchone() == \
                            ("pgolf", "pgolf")
                        if start == "first":
                            connection.execute("CREATE TABLE kept AS SELECT 42 AS answer")
                        else:  # the same cluster, not a new one
                            assert connection.execute("SELECT answer FROM kept").fetchone() == (42,)
                    break
                except psycopg.OperationalError:
                    assert server.poll() is None, (start, server.stdout.read() if server.stdout else "")
                    assert time.monotonic() < deadline, start
                    time.sleep(0.3)
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(url.replace("cluster-test-password", "wrong"), connect_timeout=2)
        finally:
            server.terminate()
            server.wait(30)


# --- Dockerfiles and .dockerignore --------------------------------------------------------------------------------


def test_train_image_defaults_to_the_pytorch_image_of_the_pinned_torch() -> None:
    instructions = dockerfile_instructions(DOCKER_DIR / "train.Dockerfile")
    assert instructions[0] == ("ARG", f"BASE_IMAGE=pytorch/pytorch:{pinned_torch_version()}-cuda13.0-cudnn9-runtime")
    assert instructions[1] == ("FROM", "${BASE_IMAGE}")


def test_train_image_command_is_torchrun_of_trainer_train() -> None:
    from trainer.cli import build_parser

    instructions = dockerfile_instructions(DOCKER_DIR / "train.Dockerfile")
    environment = dict(shlex.split(item)[0].split("=", 1)
                       for args in (a for i, a in instructions if i == "ENV") for item in shlex.split(args))
    (cmd,) = [args for instruction, args in instructions if instruction == "CMD"]
    expanded = re.sub(r"\$\{?(\w+)(?::-[^}]*)?\}?", lambda m: environment[m.group(1)], cmd)
    argv = shlex.split(expanded)
    assert argv[:4] == ["exec", "python", "-m", "torch.distributed.run"]
    assert "--standalone" in argv and "--nproc_per_node=8" in argv
    module_at = argv.index("-m", 4)
    assert argv[module_at + 1] == "trainer"
    args = build_parser().parse_args(argv[module_at + 2:])
    assert (args.command, args.preset, args.data) == ("train", "pr940", "/data/datasets/fineweb10B_sp1024")


def test_service_image_runs_unprivileged_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions(DOCKER_DIR / "service.Dockerfile")
    assert instructions[0][1].startswith("BASE_IMAGE=python:3.11-slim")
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert instructions[-1] == ("USER", users[-1]), "nothing may run as root after the switch"
    assert any(i == "HEALTHCHECK" and "/healthz" in a for i, a in instructions)
    assert ("CMD", '["python", "-m", "service", "serve"]') in instructions


def test_dockerignore_keeps_data_and_environments_out_but_not_the_project() -> None:
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "data", "artifacts", "**/*.whl", "**/*.pgolf"} <= set(patterns)
    needed = ["pyproject.toml", "README.md", "trainer", "service", "verifier", "docker"]
    assert not [name for name in needed if name in patterns]


# --- smoke.sh and the demo client, run for real --------------------------------------------------------------------


def test_smoke_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(DOCKER_DIR / "smoke.sh")], check=True)


def test_smoke_reports_a_skip_not_a_pass_where_no_engine_can_be_started(tmp_path: Path) -> None:
    # A machine whose docker client finds no engine, for a user who is not root.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, body in {"docker": "exit 1", "id": "echo 1000"}.items():
        (fake_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake_bin / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin"}
    result = subprocess.run(["bash", str(DOCKER_DIR / "smoke.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "SMOKE SKIPPED: no running Docker engine, and starting one needs root" in result.stdout
    assert "PASSED" not in result.stdout


class _FakeService(BaseHTTPRequestHandler):
    """POST /evaluate: checks the multipart upload, then streams the events given to the server."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        (part,) = message.iter_parts()
        self.server.received = (self.path, part.get_param("name", header="content-disposition"),  # type: ignore[attr-defined]
                                part.get_payload(decode=True), self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for event in self.server.events:  # type: ignore[attr-defined]
            self.wfile.write(json.dumps(event).encode() + b"\n")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def fake_service() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_demo_client(server: ThreadingHTTPServer, tmp_path: Path, events: list[dict]) -> tuple[int, Path]:
    server.events = events  # type: ignore[attr-defined]
    artifact, report = tmp_path / "model.pgolf", tmp_path / "out" / "eval-report.ndjson"
    artifact.write_bytes(b"PGOLF\x00" + bytes(range(256)) * 40)
    result = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "demo_client.py"), "--url", f"http://127.0.0.1:{server.server_port}",
         "--artifact", str(artifact), "--report", str(report)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PGOLF_API_TOKEN": "demo-client-test-token"})
    assert server.received == ("/evaluate", "artifact", artifact.read_bytes(),  # type: ignore[attr-defined]
                               "Bearer demo-client-test-token")
    return result.returncode, report


def test_demo_client_uploads_and_keeps_the_event_stream(fake_service: ThreadingHTTPServer, tmp_path: Path) -> None:
    events = [{"type": "start", "job": "j1"}, {"type": "chunk", "index": 0, "bpb": 3.2},
              {"type": "end", "val_bpb": 3.1}]
    status, report = run_demo_client(fake_service, tmp_path, events)
    assert status == 0
    assert [json.loads(line) for line in report.read_text().splitlines()] == events


def test_demo_client_fails_when_the_evaluation_does_not_end(fake_service: ThreadingHTTPServer,
                                                            tmp_path: Path) -> None:
    status, report = run_demo_client(fake_service, tmp_path, [{"type": "start"}, {"type": "timeout"}])
    assert status == 1
    assert len(report.read_text().splitlines()) == 2
