"""Reading a request body: media type, size, nesting depth, JSON, then the pydantic model.

Every way a body can be wrong is a 4xx with an OpenAI-style error, never a 500: a
non-JSON media type is 415 (which also keeps cross-site pages, whose forms and plain
`fetch` can only send text/plain, urlencoded or multipart bodies without a CORS preflight,
from starting generations); over the size limit 413; not UTF-8, not JSON, nested deeper
than MAX_JSON_DEPTH, or not matching the model 400. A client that hangs up mid-upload is a
client abort (ClientDisconnected), not a server error. Large bodies are parsed on the
worker pool so that a megabyte of JSON does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import Executor
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from server.api.errors import APIError, bad_request, from_validation_error
from server.api.sse import ClientDisconnected

M = TypeVar("M", bound=BaseModel)
MAX_JSON_DEPTH = 32  # the deepest valid body (chat content parts) is 5 levels deep
OFF_LOOP_BYTES = 64 << 10  # bodies at least this large are parsed on the worker pool
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


async def read_body_model(request: Request, model: type[M], limit: int, pool: Executor) -> M:
    """The body as `model`, or the APIError that says what is wrong with it."""
    require_json(request)
    body = await read_body(request, limit)
    if len(body) < OFF_LOOP_BYTES:
        return parse_body(body, model)
    return await asyncio.get_running_loop().run_in_executor(pool, parse_body, body, model)


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = f"'{media_type}'" if media_type else "none"
        raise APIError(415, f"the body must be sent as 'Content-Type: application/json' (got "
                            f"{shown})", "invalid_request_error", code="unsupported_media_type",
                       metric_reason="validation")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body: 413 beyond `limit` bytes; ClientDisconnected if the client hangs up."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected(submitted=False) from None
    return b"".join(chunks)


def parse_body(body: bytes, model: type[M]) -> M:
    """One parse (pydantic's, in Rust), after the checks that give the clearer messages."""
    if json_too_deep(body):
        raise bad_request(f"the body nests deeper than {MAX_JSON_DEPTH} levels",
                          code="invalid_json")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the body is not valid UTF-8 (byte {e.start})",
                          code="invalid_json") from None
    if not _OBJECT_START.match(body):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:  # invalid JSON included ("Invalid JSON: ... at line 1 ...")
        raise from_validation_error(e) from None


def json_too_deep(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests more than `max_depth` arrays/objects (a malformed text
    answers False: the parser then says what is wrong). Brackets inside strings are removed
    first; then each round deletes every innermost empty pair, so a text `d` levels deep
    clears in at most `d` rounds. All in C: bytes.count, re.sub, translate, replace."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        reduced = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if reduced == brackets:
            return False  # unbalanced or mismatched: not JSON
        brackets = reduced
    return bool(brackets) and brackets.replace(b"[]", b"").replace(b"{}", b"") != brackets


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes",
                    "invalid_request_error", code="request_too_large", metric_reason="validation")
