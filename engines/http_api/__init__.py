"""SGLang's HTTP API (native + OpenAI-compatible) over any `EngineCore`, as an aiohttp application.

Shapes follow `sglang/srt/entrypoints/http_server.py` and `openai/` of 0.5.10.post1 (and the
`kv_event_sources` entry of 0.5.23's `/server_info`); see PROTOCOLS.md section 2. Prompts are
tokenized here (the byte tokenizer by default, so a router with the same default agrees with the
engine on every block hash); the engine only sees token ids.

Modules: `common` (app state, parsing, errors, the engine seam), `sse`, `native` (/generate and SGLang's
own endpoints), `openai` (/v1/*), `metrics` (/metrics), `app` (`create_app`, the route table).
"""

from kvroute.engines.http_api.app import create_app
from kvroute.engines.http_api.common import SGLANG_VERSION, STATE, ApiError, ApiState

__all__ = ["SGLANG_VERSION", "STATE", "ApiError", "ApiState", "create_app"]
