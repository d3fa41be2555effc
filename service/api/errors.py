"""One error shape for every refusal the service makes: `{"code": ..., "message": ...}`.

Besides the service's own ApiError, FastAPI's request validation errors (bad query or header values), Starlette's
HTTP errors (unknown route, wrong method) and storage failures are answered in the same shape, and an unexpected
exception is a 500 in that shape too, so no client ever has to parse a second format.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.storage import StorageFull, StorageUnavailable

log = logging.getLogger("pgolf.service")
STORAGE_RETRY_AFTER_SECONDS = 5


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


async def api_error_handler(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(error.status_code, error.code, error.message, error.headers)


async def _validation_handler(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = []
    for problem in error.errors()[:5]:
        where = ".".join(str(part) for part in problem.get("loc", ()))
        problems.append(f"{where}: {problem.get('msg')}")
    return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")


async def _http_handler(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(error.status_code, codes.get(error.status_code, "http_error"), str(error.detail),
                          dict(error.headers or {}))


async def _storage_full_handler(_request: Request, error: Exception) -> JSONResponse:
    return error_response(507, "storage_full", str(error))


async def _storage_unavailable_handler(_request: Request, error: Exception) -> JSONResponse:
    return error_response(503, "storage_unavailable", f"{error}; retry shortly",
                          {"Retry-After": str(STORAGE_RETRY_AFTER_SECONDS)})


async def _unexpected_handler(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s %s", request.method, request.url.path, exc_info=error)
    return error_response(500, "internal", "the service failed on this request; the error is in its log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(StorageFull, _storage_full_handler)
    app.add_exception_handler(StorageUnavailable, _storage_unavailable_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
