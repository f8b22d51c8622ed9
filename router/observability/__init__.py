"""Where a request's latency goes: phases, the access log, the recent-requests ring, tracing, the status
page and `kvroute diagnose` (docs/observability.md)."""

from kvroute.router.observability.phases import TTFT_PHASES, RequestPhases
from kvroute.router.observability.recorder import PHASES, Observability

__all__ = ["PHASES", "TTFT_PHASES", "Observability", "RequestPhases"]
