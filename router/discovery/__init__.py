"""Where workers come from, and what each says about itself.

- `server_info`: `/server_info` + `/model_info` -> `Worker` fields and the KV-event endpoint (pure).
- `base`: `DiscoveredWorker` and the `DiscoverySource` protocol every source implements.
- `sync`: `DiscoverySync`, which turns a source's snapshots into registry adds and drains.
- one file per source: `kubernetes` (pods by label selector, `kvroute[kubernetes]`), `dns` (a headless
  service's A/AAAA or SRV records, `kvroute[dns]`), `file` (a list the operator's tooling writes).
- `runner`: picks the configured source and runs it for the app's lifetime.
"""

from kvroute.router.discovery.server_info import apply_server_info, discover_kv_events, page_size_problem

__all__ = ["apply_server_info", "discover_kv_events", "page_size_problem"]
