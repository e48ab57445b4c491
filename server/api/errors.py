"""OpenAI-style error bodies and the exceptions that carry them through the app."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.protocol import UNIMPLEMENTED_FIELDS, ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)

# Human-readable descriptions of the union-typed fields, whose raw pydantic errors list
# one complaint per alternative.
_UNION_FIELD_HINTS = {
    "prompt": "prompt must be a non-empty string, a list of strings, a list of token ids or a "
              "list of token-id lists",
    "stop": "stop must be a non-empty string or a list of at most 16 non-empty strings",
    "content": "content must be a string or a non-empty list of {type: text, text} parts",
}


class APIError(Exception):
    """An error that becomes an HTTP response with an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None, metric_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        # The reason counted in the failed-requests metric; None for errors not about a request
        self.metric_reason = metric_reason

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code,
                              self.headers)


def error_response(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code, metric_reason="validation")


def service_unavailable(message: str, code: str, retry_after_s: int, reason: str) -> APIError:
    return APIError(503, message, "service_unavailable_error", None, code,
                    {"Retry-After": str(retry_after_s)}, metric_reason=reason)


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem of a pydantic error, as a 400 naming the offending parameter."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = [str(p) for p in first["loc"] if not _is_union_tag(p)]
    param = ".".join(loc) or None
    same_field = [e for e in errors if e["loc"][: len(first["loc"]) - 1] == first["loc"][:-1]]
    leaf = loc[-1] if loc else ""
    if first["type"] == "extra_forbidden":
        what = "is not implemented by attnserve" if leaf in UNIMPLEMENTED_FIELDS \
            else "is not a known parameter"
        message = f"unsupported parameter {param}: it {what} (docs/operating.md lists the " \
                  "request fields served)"
        return bad_request(message, param, code="unsupported_parameter")
    if first["type"] == "literal_error" and leaf == "type" and loc[:1] == ["response_format"]:
        message = 'response_format: only {"type": "text"} is implemented'
        return bad_request(message, "response_format", code="unsupported_parameter")
    if len(same_field) > 1 and leaf in _UNION_FIELD_HINTS:
        message = _UNION_FIELD_HINTS[leaf]
    elif first["type"] == "missing":
        message = f"missing required parameter: {param}"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
    return bad_request(message, param, code="invalid_value" if param else None)


def _is_union_tag(part: object) -> bool:
    # pydantic inserts the alternative's type name ("list[int]", "constrained-str") in loc
    return isinstance(part, str) and (
        "[" in part or part.startswith("constrained-") or part in ("str", "int", "function-after")
    )


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(404, f"Invalid URL ({request.method} {request.url.path})",
                              "invalid_request_error", code="unknown_url")
    if exc.status_code == 405:
        return error_response(405, f"Method {request.method} not allowed on {request.url.path}",
                              "invalid_request_error", code="method_not_allowed",
                              headers=dict(exc.headers or {}))
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    """Anything that escaped the endpoints' own handling (api_endpoint) still gets a JSON 500."""
    logger.error("internal error serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error (the server log has the details)",
                          "server_error", code="internal_error")
