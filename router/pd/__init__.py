"""Prefill/decode disaggregation: pair selection, conditional disaggregation and SGLang's bootstrap fan-out.

Modules by role: `model` (config, route, record, protocols), `selection` (pair choice and conditional
disaggregation), `bootstrap` (rooms and field insertion, pure), `fanout` (concurrent send, abort, relay).

One entry point for the proxy: `forward_pd(ctx, request, path, body, parsed, routing)`. It picks a
(prefill, decode) pair, adds `bootstrap_host`/`bootstrap_port`/`bootstrap_room` (and an `rid` when the
client gave none, so either side can be aborted by id) to the body, sends the same bytes to both servers
at once, and streams the decode server's response back (PROTOCOLS.md section 3, checked against
sglang 0.5.10 `io_struct.py` `_normalize_bootstrap_params` and `scheduler.py`).

Invariants
- Both sides of a pair get byte-identical bodies, hence the same room(s).
- Nothing reaches the client before the decode server's first chunk: until then a failure on either side
  aborts the other and the next attempt picks a new pair (excluding the worker that failed).
- Whatever ends an attempt (success, error, client gone), both upstream connections are closed and the
  side still running gets `POST /abort_request` for its rid(s) before `forward_pd` returns.
- Load is reserved on each chosen worker before sending and released in `finally`.
"""

from kvroute.router.pd.bootstrap import (
    BOOTSTRAP_KEYS,
    ROOM_BITS,
    batch_size,
    bootstrap_fields,
    bootstrap_host_of,
    insert_fields,
    new_room,
    rid_fields,
)
from kvroute.router.pd.fanout import (
    HOP_BY_HOP,
    PREFILL_WORKER_HEADER,
    WORKER_HEADER,
    PDContext,
    admission_chooser,
    count_arrival,
    forward_headers,
    forward_pd,
)
from kvroute.router.pd.model import PDConfig, PDError, PDHealth, PDObserver, PDRecord, PDRoute
from kvroute.router.pd.selection import (
    PDSelector,
    choose_admitted_route,
    choose_route,
    prefill_queue_tokens,
)

__all__ = [
    "BOOTSTRAP_KEYS",
    "HOP_BY_HOP",
    "PREFILL_WORKER_HEADER",
    "ROOM_BITS",
    "WORKER_HEADER",
    "PDConfig",
    "PDContext",
    "PDError",
    "PDHealth",
    "PDObserver",
    "PDRecord",
    "PDRoute",
    "PDSelector",
    "admission_chooser",
    "batch_size",
    "bootstrap_fields",
    "bootstrap_host_of",
    "choose_admitted_route",
    "choose_route",
    "count_arrival",
    "forward_headers",
    "forward_pd",
    "insert_fields",
    "new_room",
    "prefill_queue_tokens",
    "rid_fields",
]
