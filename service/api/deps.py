"""Typed dependencies shared by the routes."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.errors import ApiError
from service.api.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def require_write_token(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Writes (upload, cancel) need `Authorization: Bearer <PGOLF_API_TOKEN>` when a token is configured."""
    expected = state.settings.api_token
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "this service needs 'Authorization: Bearer <token>' for writes",
                       headers={"WWW-Authenticate": "Bearer"})


WriteAccess = Depends(require_write_token)
