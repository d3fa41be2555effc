"""`python -m service serve`: run the API with uvicorn, configured from the environment (see settings.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from service.api.settings import Settings, SettingsError


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the evaluation service (HTTP API and web page)",
        description="Run the evaluation service. Configuration comes from PGOLF_* environment variables "
                    "(PGOLF_DATA_DIR is required); --host and --port override PGOLF_HOST and PGOLF_PORT.",
    )
    parser.add_argument("--host", help="interface to listen on (default PGOLF_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default PGOLF_PORT or 8000; 0 picks one)")
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import announce, begin_shutdown, create_app
    from service.api.auth import UserDirectory
    from service.api.connections import protocol_with_head_deadline
    from service.api.shutdown import GracefulServer
    from service.api.storage import StorageError, open_store

    try:
        settings = Settings.from_env()
        # Checked here, before uvicorn, so that a damaged, newer or unreachable database or a bad tokens file is one
        # clear message.
        open_store(settings).close()
        UserDirectory.load(settings, announce)  # on a first start with no user: generates and prints a token
    except (SettingsError, StorageError) as error:  # StorageError: a damaged, newer or unreachable database
        print(f"pgolf serve: {error}", file=sys.stderr)
        return 2
    logging.getLogger("pgolf").setLevel(logging.INFO)  # job starts and outcomes, beside uvicorn's access log
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    app = create_app(settings)
    grace = settings.shutdown_grace_seconds
    # One uvicorn process: the job queue lives in it, and evaluations run in their own subprocesses.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info",
        http=protocol_with_head_deadline(settings.header_timeout_seconds),
        timeout_keep_alive=5, timeout_graceful_shutdown=max(0.2, grace / 2),
        proxy_headers=bool(settings.forwarded_allow_ips), forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )
    server = GracefulServer(config, grace_seconds=grace,
                            on_signal=lambda: asyncio.ensure_future(begin_shutdown(app)))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on; the shutdown itself is done
        pass
    return 0
