"""The one error boundary between kvroute and an engine: low-level failures mapped to precise types.

`engines/sglang.py` raises these `from` the aiohttp/asyncio exception; `router/errors.py` turns them
into the client's API format. `retryable` tells the proxy whether another worker may be tried.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """Base: talking to an engine failed. `url` is the engine's base URL."""

    retryable: bool = True

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message


class UpstreamConnectError(UpstreamError):
    """The engine could not be reached (refused, DNS, reset before any response)."""


class UpstreamTimeout(UpstreamError):
    """The engine did not answer (or stopped streaming) within the configured timeout."""


class UpstreamHTTPError(UpstreamError):
    """The engine answered with an error status. 5xx (but 508) and 429 are retryable; other 4xx are the
    client's."""

    def __init__(self, url: str, status: int, body: bytes = b"") -> None:
        super().__init__(url, f"HTTP {status}")
        self.status = status
        self.body = body
        # 508 Loop Detected: another worker would loop the same way.
        self.retryable = (status >= 500 and status != 508) or status == 429


class UpstreamProtocolError(UpstreamError):
    """The engine's answer could not be understood (bad JSON, truncated body)."""

    retryable = False


class UpstreamStreamBroken(UpstreamError):
    """The connection dropped after the response started (bytes may already be with the client)."""

    retryable = False
