"""Shared fixtures: the embedded corpus (built once per session), the optional FineWeb sample, and a throwaway
PostgreSQL server (one per session, an empty database per test)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Two cores shared by the test process and the subprocesses it starts: one intra-op thread each avoids the
# oversubscription that makes small models tens of times slower. Set before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.postgres_server import PostgresServer, find_bindir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def shared_sample_dir() -> Path:
    env = os.environ.get("PGOLF_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "fineweb_sample"


@pytest.fixture(scope="session")
def fineweb_sample() -> Path:
    """The real FineWeb sample beside the project; tests using it skip cleanly when it is absent."""
    root = shared_sample_dir()
    if not (root / "tokenizers" / "fineweb_1024_bpe.model").exists():
        pytest.skip(f"FineWeb sample not found at {root} (set PGOLF_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def fineweb_data(fineweb_sample: Path) -> Path:
    return fineweb_sample / "datasets" / "fineweb10B_sp1024"


@pytest.fixture(scope="session")
def fineweb_tokenizer(fineweb_sample: Path) -> Path:
    return fineweb_sample / "tokenizers" / "fineweb_1024_bpe.model"


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline embedded corpus (train/val shards, tokenizer.model, manifest.json), built once per session."""
    from trainer.data.embedded import build_embedded

    out = tmp_path_factory.mktemp("embedded")
    build_embedded(out, log=lambda _msg: None)
    return out


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster per test session (tests/postgres_server.py); skipped only when the
    PostgreSQL binaries are not installed (.ci/run installs them)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (pg_config --bindir, /usr/lib/postgresql/*/bin, PATH); "
                    "install Debian's postgresql package")
    server = PostgresServer.create(bindir)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of an empty database of this test's own on the session's PostgreSQL server."""
    return postgres_server.fresh_database()
