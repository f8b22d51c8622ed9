"""Server-sent events as SGLang writes them: `data: <json>` records, `data: [DONE]` last."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def sse_event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def end_sse(resp: web.StreamResponse) -> web.StreamResponse:
    try:
        await resp.write(SSE_DONE)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left after the last token: nothing to abort any more
    return resp


async def start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    return resp
