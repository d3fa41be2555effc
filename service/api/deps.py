"""Typed dependencies shared by the routes: the service state, the caller, and what the caller may do."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Header, Request

from service.api.auth import User
from service.api.errors import ApiError
from service.api.state import ServiceState
from service.api.storage import JobRecord


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def current_user(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> User | None:
    """The caller, or None when no token was sent. A token that is sent must be valid, wherever it is sent."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send the token as 'Authorization: Bearer <token>'")
    user = state.users.authenticate(token.strip())
    if user is None:
        raise _unauthorized("this token is not valid here")
    return user


CallerDep = Annotated[User | None, Depends(current_user)]


def same_origin_only(request: Request) -> None:
    """Refuse a write that a browser says comes from another site (defence in depth: with bearer tokens only, a
    cross-site form cannot carry the token anyway)."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        raise ApiError(403, "cross_origin", "cross-site requests may not write to this service")
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    if origin == "null" or parts.netloc.lower() != host.lower():
        raise ApiError(403, "cross_origin", f"a write from origin {origin!r} is refused: this service accepts "
                       "writes only from its own page or from non-browser clients")


def require_writer(request: Request, user: CallerDep) -> User:
    same_origin_only(request)
    if user is None:
        raise _unauthorized("this service needs 'Authorization: Bearer <token>' for uploads and cancellations")
    return user


WriterDep = Annotated[User, Depends(require_writer)]


def require_reader(state: StateDep, user: CallerDep) -> User | None:
    """Who reads; with private reads a token is needed for every read of jobs."""
    if state.settings.reads == "private" and user is None:
        raise _unauthorized("this service's jobs are private: send 'Authorization: Bearer <token>'")
    return user


ReaderDep = Annotated[User | None, Depends(require_reader)]


def may_read(state: ServiceState, user: User | None, job: JobRecord) -> bool:
    if state.settings.reads == "public":
        return True
    return user is not None and (user.admin or job.owner == user.name)


def may_cancel(user: User, job: JobRecord) -> bool:
    return user.admin or job.owner == user.name
