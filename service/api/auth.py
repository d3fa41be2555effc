"""Users: named bearer tokens, stored as sha256 hashes, and what each user may do.

Where users come from (all of them together):
- `PGOLF_API_TOKEN`: the token of the user `admin`;
- `PGOLF_TOKENS`: `user:token` entries, hashed as they are read (the plain tokens stay in the environment only);
- the tokens file (`PGOLF_TOKENS_FILE`, default `STORAGE_DIR/tokens`): `user:sha256:<hex>` lines, `#` comments.
When none of them names a user, the first start generates a token for `admin`, writes only its hash to the tokens
file and prints the token once. `python -m service token USER` makes a new entry the same way.

Rules: every write (upload, cancel) needs a valid token; a job belongs to the user who submitted it; only its
owner or an admin (`PGOLF_ADMINS`, default `admin`) may cancel it; with `PGOLF_READS=public` anyone may read every
job (a leaderboard), with `private` a user reads only their own jobs and admins read all. A wrong token is refused
even where none is needed. Tokens travel only in the `Authorization` header, never in a cookie, so a page on
another site cannot make a browser act for its user (no CSRF surface); writes that a browser marks as
cross-origin are refused as well.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.api.settings import Settings, SettingsError, valid_user_name

GENERATED_USER = "admin"
_HASHED_LINE = re.compile(r"([^:\s]+):sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class User:
    name: str
    admin: bool


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "pgolf_" + secrets.token_urlsafe(32)


class UserDirectory:
    """Token hash -> user name, plus the admin names."""

    def __init__(self, hashes: dict[str, str], admins: tuple[str, ...]) -> None:
        self._hashes = hashes
        self._admins = frozenset(admins)

    def __len__(self) -> int:
        return len(set(self._hashes.values()))

    def authenticate(self, token: str) -> User | None:
        presented = token_hash(token)
        for known, name in self._hashes.items():  # compare_digest over all: no early exit on a near miss
            if hmac.compare_digest(presented, known):
                return User(name, name in self._admins)
        return None

    @classmethod
    def load(cls, settings: Settings, announce: Callable[[str], None]) -> UserDirectory:
        """Every configured user; on a first start with none, a generated admin token (announced once)."""
        hashes: dict[str, str] = {}

        def add(name: str, digest: str, source: str) -> None:
            if digest in hashes and hashes[digest] != name:
                raise SettingsError(f"{source}: the token of {name!r} is also the token of {hashes[digest]!r}")
            hashes[digest] = name

        if settings.api_token:
            add(GENERATED_USER, token_hash(settings.api_token), "PGOLF_API_TOKEN")
        for name, token in settings.user_tokens:
            add(name, token_hash(token), "PGOLF_TOKENS")
        path = settings.token_file_path
        for name, digest in read_tokens_file(path):
            add(name, digest, str(path))
        if not hashes:
            token = new_token()
            append_token_line(path, GENERATED_USER, token)
            add(GENERATED_USER, token_hash(token), str(path))
            announce(f"pgolf: no API token was configured, so one was generated for the user "
                     f"'{GENERATED_USER}' (an admin). It is printed only now; its sha256 is kept in {path}.\n"
                     f"pgolf: PGOLF_TOKEN={token}")
        return cls(hashes, settings.admins)


def read_tokens_file(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    entries = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HASHED_LINE.fullmatch(line)
        if match is None or not valid_user_name(match.group(1)):
            raise SettingsError(f"{path}:{number}: expected 'user:sha256:<64 hex digits>' (tokens are stored "
                                "hashed; `python -m service token USER` makes a line)")
        entries.append((match.group(1), match.group(2)))
    return entries


def append_token_line(path: Path, user: str, token: str) -> None:
    """Add `user:sha256:<hash of token>` to the tokens file (created readable by its owner only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a") as handle:
        handle.write(f"{user}:sha256:{token_hash(token)}\n")


# ----------------------------------------------------------------------------------------------------------------
# `python -m service token USER`


def add_token_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "token", help="create an API token for a user (its hash goes to the tokens file)",
        description="Generate a token for USER, append its sha256 to the tokens file (PGOLF_TOKENS_FILE, default "
                    "PGOLF_STORAGE_DIR/tokens) and print the token once. Restart the service to load it.")
    parser.add_argument("user", help="user name (letters, digits, '_', '.', '-')")
    parser.add_argument("--file", type=Path, help="tokens file (default: as the service finds it)")
    parser.set_defaults(handler=run_token)


def run_token(args: argparse.Namespace) -> int:
    if not valid_user_name(args.user):
        print(f"pgolf token: {args.user!r} is not a valid user name", file=sys.stderr)
        return 2
    path = args.file
    if path is None:
        explicit = os.environ.get("PGOLF_TOKENS_FILE")
        path = Path(explicit) if explicit else Path(os.environ.get("PGOLF_STORAGE_DIR") or "runs/service") / "tokens"
    token = new_token()
    append_token_line(path, args.user, token)
    print(f"token for {args.user} (shown once; its sha256 is now in {path}):\n{token}")
    return 0
