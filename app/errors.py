"""Domain errors and their JSON shape: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, details: dict[str, Any] | None = None, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code:
            self.code = code


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class Unprocessable(ApiError):
    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "upload_too_large"


class TooManyRequests(ApiError):
    status_code = 429
    code = "too_many_requests"


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
        fields = [".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
        message = "invalid request: " + "; ".join(
            f"{field or 'body'}: {e.get('msg', 'invalid')}" for field, e in zip(fields, errors)
        )
        body = error_body("validation_error", message[:2000], {"errors": errors})
        body["detail"] = errors  # FastAPI's usual shape, for clients that expect it
        return JSONResponse(body, status_code=422)

    @app.exception_handler(SQLAlchemyTimeout)
    @app.exception_handler(OperationalError)
    async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Pool exhausted under overload, or the database is down: retryable, not a server bug.
        return JSONResponse(error_body("service_unavailable", "the database is busy or unreachable; retry shortly"),
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
