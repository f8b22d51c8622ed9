"""Client-facing errors: one exception type for the HTTP layer and its rendering in each API's format.

OpenAI routes (`/v1/*`) get `{"error": {"message", "type", "param", "code"}}`; SGLang's native routes
and the admin API get `{"error": {"message", "type", "code"}}` (SGLang's own shape, plus type/code).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from kvroute.engines.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamStreamBroken,
    UpstreamTimeout,
)


class ApiError(Exception):
    """An error to show the client as is: status, message, machine-readable type."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code or type_
        self.headers = headers  # extra response headers (Retry-After, Allow)


def too_many_requests(message: str, code: str, retry_after_s: int) -> ApiError:
    """429 in the API's format with `Retry-After` (whole seconds): admission and quotas."""
    return ApiError(429, message, "rate_limit_error", code, headers={"Retry-After": str(retry_after_s)})


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def json_object(raw: bytes) -> dict[str, Any]:
    """A client's request body as a JSON object, else the 400 it gets (serving and admin routes alike)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON: {exc}", "invalid_json") from exc
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", "invalid_json")
    return data


def from_upstream(exc: UpstreamError) -> ApiError:
    """The error shown when every attempt failed; `exc` is the last attempt's."""
    up = "upstream_error"
    if isinstance(exc, UpstreamTimeout):
        return ApiError(504, f"upstream engine timed out: {exc.message}", up, "upstream_timeout")
    if isinstance(exc, UpstreamHTTPError):
        if exc.status == 508:  # a router behind us found the request looping
            return ApiError(508, "request loop detected downstream", "invalid_request_error", "loop_detected")
        if exc.status == 429:
            return ApiError(429, "every engine tried is overloaded (429)", "rate_limit_error", "upstream_429")
        return ApiError(502, f"upstream engine failed with HTTP {exc.status}", up, f"upstream_{exc.status}")
    if isinstance(exc, UpstreamStreamBroken):
        return ApiError(502, f"upstream engine stream broke: {exc.message}", up, "stream_broken")
    if isinstance(exc, UpstreamConnectError):
        return ApiError(502, f"cannot reach upstream engine: {exc.message}", up, "upstream_unreachable")
    return ApiError(502, f"upstream engine error: {exc.message}", up, up)


def error_body(err: ApiError, *, openai: bool) -> bytes:
    inner: dict[str, object] = {"message": err.message, "type": err.type, "code": err.code}
    if openai:
        inner["param"] = None
    return orjson.dumps({"error": inner})


def error_response(err: ApiError, *, openai: bool, headers: dict[str, str] | None = None) -> web.Response:
    if err.headers:
        headers = {**err.headers, **(headers or {})}
    resp = web.Response(
        status=err.status,
        body=error_body(err, openai=openai),
        content_type="application/json",
        headers=headers,
    )
    if headers and headers.get("Connection", "").lower() == "close":
        resp.force_close()  # e.g. a body that never fully arrived: the connection's state is unknown
    return resp


def sse_error_event(err: ApiError, *, openai: bool) -> bytes:
    """What a stream that broke after bytes reached the client ends with (then `data: [DONE]`)."""
    return b"data: " + error_body(err, openai=openai) + b"\n\ndata: [DONE]\n\n"
