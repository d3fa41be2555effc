"""`python -m service serve`: run the API with uvicorn, configured from the environment (see settings.py)."""

from __future__ import annotations

import argparse
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

    from service.api.app import create_app

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"pgolf serve: {error}", file=sys.stderr)
        return 2
    logging.getLogger("pgolf").setLevel(logging.INFO)  # job starts and outcomes, beside uvicorn's access log
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    # One uvicorn process: the job queue lives in it, and evaluations run in their own subprocesses.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    return 0
