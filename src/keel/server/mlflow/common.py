"""What every MLflow route shares: MLflow's error replies, request arguments, roles,
JSON replies with NaN as a string, page tokens.

MLflow clients parse `{"error_code": "...", "message": "..."}` and rely on the status
that goes with each code (404 RESOURCE_DOES_NOT_EXIST, 400 RESOURCE_ALREADY_EXISTS...),
so these routes answer in that shape, not in keel's /api/v1 one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException

from keel import errors as keel_errors
from keel.server.auth import Principal
from keel.server.deps import get_store, require
from keel.server.errors import RETRY_AFTER, ApiError, store_unreachable
from keel.server.guard import Refused
from keel.store.limits import INT64_MAX, INT64_MIN, shown, text_problem
from keel.store.metadata import MetadataStore

log = logging.getLogger("keel.server.mlflow")

STATUS_BY_CODE = {
    "RESOURCE_DOES_NOT_EXIST": 404,
    "ENDPOINT_NOT_FOUND": 404,
    "RESOURCE_ALREADY_EXISTS": 400,
    "RESOURCE_CONFLICT": 409,
    "INVALID_PARAMETER_VALUE": 400,
    "BAD_REQUEST": 400,
    "INVALID_STATE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "TEMPORARILY_UNAVAILABLE": 503,
    "INTERNAL_ERROR": 500,
}


class MlflowError(Exception):
    """Raised by route code: an MLflow-shaped error reply."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        self.code = code
        self.message = message
        self.status = status or STATUS_BY_CODE[code]
        super().__init__(message)

    def response(self) -> Response:
        out = reply({"error_code": self.code, "message": self.message}, self.status)
        if self.status == 503:
            # What MLflow's client retries on, and when to.
            out.headers["Retry-After"] = RETRY_AFTER
        return out


def not_found(message: str) -> MlflowError:
    return MlflowError("RESOURCE_DOES_NOT_EXIST", message)


def invalid(message: str) -> MlflowError:
    return MlflowError("INVALID_PARAMETER_VALUE", message)


def _keel_code(exc: keel_errors.KeelError) -> str:
    if isinstance(
        exc,
        keel_errors.RunNotFoundError
        | keel_errors.StepNotFoundError
        | keel_errors.ModelNotFoundError,
    ):
        return "RESOURCE_DOES_NOT_EXIST"
    if isinstance(exc, keel_errors.StoreUnavailableError | keel_errors.ArtifactWriteError):
        return "TEMPORARILY_UNAVAILABLE"
    if isinstance(exc, keel_errors.ArtifactIntegrityError):
        return "RESOURCE_CONFLICT"
    return "INVALID_PARAMETER_VALUE"


def as_mlflow_error(exc: Exception) -> MlflowError | None:
    """The MLflow error for an exception raised by a route or a dependency, if known."""
    if isinstance(exc, MlflowError):
        return exc
    if isinstance(exc, Refused):  # an upload past its cap, while it streamed
        text = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return MlflowError("BAD_REQUEST", text, exc.status)
    if store_unreachable(exc):
        log.warning("metadata store error: %s", exc)
        return MlflowError(
            "TEMPORARILY_UNAVAILABLE", "the metadata store cannot be reached; try again"
        )
    if isinstance(exc, ApiError):
        codes = {
            401: "UNAUTHENTICATED",
            403: "PERMISSION_DENIED",
            404: "RESOURCE_DOES_NOT_EXIST",
            409: "RESOURCE_CONFLICT",
        }
        return MlflowError(codes.get(exc.status, "BAD_REQUEST"), exc.message)
    if isinstance(exc, keel_errors.KeelError):
        text = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return MlflowError(_keel_code(exc), text)
    if isinstance(exc, RequestValidationError):
        return MlflowError("BAD_REQUEST", f"the request is not valid: {exc.errors()}")
    if isinstance(exc, HTTPException):
        status = "ENDPOINT_NOT_FOUND" if exc.status_code == 404 else "BAD_REQUEST"
        return MlflowError(status, str(exc.detail))
    if isinstance(exc, sa_exc.DataError | UnicodeError | OverflowError):
        # A value the checks did not catch and the database (or its driver) could not
        # hold: the request's fault, not the server's.
        orig = getattr(exc, "orig", None) or exc
        detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        return invalid(f"the database refused a value of the request: {detail}")
    return None


class MlflowRoute(APIRoute):
    """A route whose every failure, including auth and validation, answers MLflow's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                known = as_mlflow_error(exc)
                if known is not None:
                    return known.response()
                log.exception("unexpected error in an MLflow route")
                return MlflowError(
                    "INTERNAL_ERROR", f"internal error ({type(exc).__name__}); see the server log"
                ).response()

        return run


# -- replies ------------------------------------------------------------------------------


def number(value: float | None) -> float | str | None:
    """A double as protobuf JSON writes it: NaN and the infinities as strings."""
    if value is None:
        return None
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def reply(body: Any, status: int = 200) -> Response:
    data = json.dumps(body, separators=(",", ":"), allow_nan=False)
    return Response(data, status_code=status, media_type="application/json")


def ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def seconds(value: Any, what: str) -> float | None:
    """Epoch milliseconds (a number or a decimal string, 64-bit as in MLflow) as epoch
    seconds."""
    if value is None or value == "":
        return None
    try:
        millis = int(value)
    except (TypeError, ValueError, OverflowError):
        raise invalid(f"{what} must be epoch milliseconds, got {value!r}") from None
    return whole(millis, what) / 1000.0


def whole(value: int, what: str) -> int:
    """`value` if it fits in 64 bits (MLflow's int64 fields), else a 400 naming `what`."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise invalid(f"{what} {value} is out of range: it must fit in 64 bits")
    return value


# Integer columns of keel's ids (experiment ids, model versions, step positions) are
# 32-bit on PostgreSQL: a larger number names nothing, so it is looked up as nothing.
_MAX_ID = 2**31 - 1


def stored_id(text: str) -> int | None:
    """The id `text` spells in ASCII digits, or None if it cannot name a stored row."""
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    number = int(text)
    return number if number <= _MAX_ID else None


def check_texts(value: Any, where: str = "") -> None:
    """Every string in the request (keys too) must be storable: no NUL character, no
    lone surrogate. A 400 names the field, e.g. `tags[0].value`."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise invalid(f"{where or 'a value'} {shown(value)} has {problem}")
    elif isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and text_problem(key) is not None:
                raise invalid(
                    f"a field name in {where or 'the request'} {shown(key)} has {text_problem(key)}"
                )
            check_texts(item, path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_texts(item, f"{where}[{index}]")


# -- arguments ----------------------------------------------------------------------------


async def _args(request: Request) -> dict[str, Any]:
    """A GET's query parameters, or the JSON body of any other method (DELETE carries
    a body too). A change never takes its arguments from the query string, which an
    HTML form on another site could fill in."""
    args: dict[str, Any] = {}
    if request.method == "GET":
        for key in request.query_params:
            values = request.query_params.getlist(key)
            args[key] = values[0] if len(values) == 1 else values
    else:
        raw = await request.body()
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                raise MlflowError("BAD_REQUEST", "the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise MlflowError("BAD_REQUEST", "the request body must be a JSON object")
            args.update(body)
    check_texts(args)
    return args


Args = Annotated[dict[str, Any], Depends(_args)]
Store = Annotated[MetadataStore, Depends(get_store)]
Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def text_arg(args: dict[str, Any], *names: str, required: bool = True) -> str:
    """The first of `names` given (MLflow sends run ids as both run_id and run_uuid)."""
    for name in names:
        value = args.get(name)
        if value not in (None, ""):
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise invalid(f"{name} must be a string, got {value!r}")
            return str(value)
    if required:
        raise invalid(f"missing value for required parameter {names[0]!r}")
    return ""


def int_arg(args: dict[str, Any], name: str, default: int, top: int) -> int:
    value = args.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise invalid(f"{name} must be a whole number, got {value!r}") from None
    if number < 1 or number > top:
        raise invalid(f"{name} must be between 1 and {top}, got {number}")
    return number


def list_arg(args: dict[str, Any], name: str) -> list[Any]:
    value = args.get(name)
    if value in (None, ""):
        return []
    return value if isinstance(value, list) else [value]


def key_values(args: dict[str, Any], name: str) -> dict[str, str]:
    """`[{"key": k, "value": v}, ...]` as a dict."""
    out: dict[str, str] = {}
    for item in list_arg(args, name):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise invalid(f"each of {name} must be an object with a string 'key'")
        value = item.get("value")
        out[item["key"]] = "" if value is None else str(value)
    return out


def pairs(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in values.items()]


# -- page tokens ---------------------------------------------------------------------------


def encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def decode_token(token: Any) -> int:
    if token in (None, ""):
        return 0
    try:
        offset = json.loads(base64.urlsafe_b64decode(str(token).encode()))["offset"]
        if isinstance(offset, int) and 0 <= offset <= _MAX_ID:
            return offset
    except (ValueError, KeyError, TypeError, binascii.Error):
        pass
    raise invalid("page_token is not one this server returned")
