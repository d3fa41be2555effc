"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl in a temporary directory, as an unprivileged user.

    server = PostgresServer.create()        # initdb once (~2-4 s), then start on 127.0.0.1 and a free port
    url = server.fresh_database()           # an empty database of its own for each test (CREATE DATABASE)
    server.stop(); server.start()           # a server that goes away mid-run, and comes back
    server.destroy()                        # stop it and delete the directory

PostgreSQL refuses to run as root, so as root (CI containers) every server command runs as Debian's `postgres`
user through `runuser`, and the directory is handed to that user; otherwise as the current user. The cluster
trusts local connections (it listens on 127.0.0.1 and a unix socket inside its own directory only) and runs
without fsync: a killed server loses no commit (the OS still has it), and CREATE DATABASE and commits are fast.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

UNPRIVILEGED_USER = "postgres"  # Debian's package creates it
SUPERUSER = "pgolf"
START_TIMEOUT_SECONDS = 30


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl live: `pg_config --bindir`, then Debian's versioned directories, then PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path, root: Path, run_as: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.data_dir = root / "data"
        self.log_file = root / "server.log"
        self.run_as = run_as
        self.port = 0
        self._databases = itertools.count()

    @classmethod
    def create(cls, bindir: Path | None = None) -> PostgresServer:
        bindir = bindir or find_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found")
        root = Path(tempfile.mkdtemp(prefix="pgolf-postgres-"))
        run_as = None
        if os.geteuid() == 0:
            run_as = UNPRIVILEGED_USER
            account = pwd.getpwnam(run_as)
            os.chown(root, account.pw_uid, account.pw_gid)
        server = cls(bindir, root, run_as)
        try:
            server._run("initdb", "-D", str(server.data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync",
                        "--encoding=UTF8", "--locale=C", "--no-instructions")
            server.start()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / program), *args]
        if self.run_as is not None:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.root, timeout=120)
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr.strip()}\n{log}")
        return result

    def start(self) -> None:
        """Start on the port of the last start (so URLs stay valid across a restart), or a free one."""
        for _attempt in range(3):
            self.port = self.port or _free_port()
            # fsync off, synchronous_commit on: a commit is written to the OS before it returns, so a server
            # killed by stop() (a crash) keeps every committed row, but nothing waits for the disk.
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                       "-c full_page_writes=off -c max_connections=200")
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                          "-t", str(START_TIMEOUT_SECONDS), "-o", options, "start")
                return
            except RuntimeError:
                if "could not bind" not in self.log_file.read_text(errors="replace"):
                    raise
                self.port = 0  # taken by someone else meanwhile
        raise RuntimeError(f"PostgreSQL could not bind a free port; see {self.log_file}")

    def stop(self) -> None:
        """Stop at once (`immediate`: like a crash, which is what the outage tests want)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)
