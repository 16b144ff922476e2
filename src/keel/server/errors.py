"""Every error answers JSON `{"error": {"code", "message", "details"}}`, never a trace."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

from keel import errors as keel_errors

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

log = logging.getLogger("keel.server")

# Seconds a client should wait before retrying a 503 (the store is unreachable).
RETRY_AFTER = "5"


def store_unreachable(exc: BaseException) -> bool:
    """Whether an error means the metadata store cannot be reached (a blip)."""
    return isinstance(exc, sa_exc.OperationalError | keel_errors.StoreUnavailableError) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    )


class ApiError(Exception):
    """Raised by route code: becomes a JSON error reply with this status."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        super().__init__(message)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


# keel errors that mean "the thing you asked for does not exist" or "bad request".
_STATUS_BY_ERROR: list[tuple[type[keel_errors.KeelError], int, str]] = [
    (keel_errors.RunNotFoundError, 404, "not_found"),
    (keel_errors.StepNotFoundError, 404, "not_found"),
    (keel_errors.ModelNotFoundError, 404, "not_found"),
    (keel_errors.ParameterError, 422, "invalid_parameters"),
    (keel_errors.TrackingError, 400, "bad_request"),
    (keel_errors.DefinitionError, 400, "bad_request"),
    (keel_errors.RunStateError, 409, "conflict"),
    (keel_errors.StoreUnavailableError, 503, "store_unavailable"),
    (keel_errors.ArtifactIntegrityError, 409, "artifact_changed"),
    (keel_errors.ArtifactWriteError, 503, "artifact_store_unavailable"),
]


def install(app: FastAPI) -> None:
    # Imported here: `keel serve` uses ApiError (through the guard) without FastAPI.
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse(
            error_body("invalid_request", "the request is not valid", details), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(keel_errors.KeelError)
    async def _keel(_: Request, exc: keel_errors.KeelError) -> JSONResponse:
        status, code = next(
            ((st, cd) for cls, st, cd in _STATUS_BY_ERROR if isinstance(exc, cls)),
            (400, "bad_request"),
        )
        details = {"run_id": exc.run_id, "step_key": exc.step_key, "hint": exc.hint}
        headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
        return JSONResponse(
            error_body(code, exc.message, details), status_code=status, headers=headers
        )

    @app.exception_handler(sa_exc.DataError)
    async def _data(_: Request, exc: sa_exc.DataError) -> JSONResponse:
        # A value the database cannot hold (a NUL character on PostgreSQL, a number
        # out of range): the request's fault, not the server's.
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig else "a bad value"
        return JSONResponse(
            error_body("bad_request", f"the database refused a value: {detail}"), status_code=400
        )

    @app.exception_handler(UnicodeError)
    @app.exception_handler(OverflowError)
    async def _unstorable(_: Request, exc: Exception) -> JSONResponse:
        # Text that is not valid Unicode or a number beyond 64 bits reached the
        # database driver: the request's fault too.
        return JSONResponse(
            error_body("bad_request", f"a value of the request cannot be stored: {exc}"),
            status_code=400,
        )

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    async def _unreachable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("metadata store error: %s", exc)
        return JSONResponse(
            error_body("store_unavailable", "the metadata store cannot be reached; try again"),
            status_code=503,
            headers={"Retry-After": RETRY_AFTER},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected server error")
        return JSONResponse(
            error_body("internal", f"internal error ({type(exc).__name__}); see the server log"),
            status_code=500,
        )
