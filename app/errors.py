"""Domain errors carry their status; one handler renders {"error", "detail"}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException


class AppError(Exception):
    status_code = 400
    error = "BadRequest"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class Unauthorized(AppError):
    status_code, error = 401, "Unauthorized"


class NotFound(AppError):
    status_code, error = 404, "NotFound"


class Conflict(AppError):
    status_code, error = 409, "Conflict"


class Invalid(AppError):
    status_code, error = 422, "InvalidRequest"


class TooLarge(AppError):
    status_code, error = 413, "PayloadTooLarge"


class RateLimited(AppError):
    status_code, error = 429, "RateLimited"


class QuotaExceeded(AppError):
    status_code, error = 429, "QuotaExceeded"


class ArtifactCorrupted(AppError):
    status_code, error = 500, "ArtifactCorrupted"


class Unavailable(AppError):
    status_code, error = 503, "ServiceUnavailable"


def error_body(error: str, detail: str) -> dict[str, str]:
    return {"error": error, "detail": detail}


HTTP_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    422: "InvalidRequest",
    429: "RateLimited",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(error_body(exc.error, exc.detail), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse(error_body("InvalidRequest", problems or "invalid request"), status_code=422)

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        # the database went away or is locked: a dependency problem, so 503 and a hint to retry
        return JSONResponse(
            error_body("ServiceUnavailable", "the database is unavailable; retry shortly"),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = HTTP_NAMES.get(exc.status_code, "Error")
        return JSONResponse(
            error_body(name, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )
