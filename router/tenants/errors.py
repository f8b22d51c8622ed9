"""Why a request is refused for now: the one exception admission and quotas raise (HTTP 429)."""

from __future__ import annotations

import math


class Rejected(Exception):
    """Over quota, queue full or waited too long; `retry_after_s` is whole seconds, >= 1."""

    def __init__(self, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason  # quota_concurrency | quota_tokens | queue_full | queue_timeout | no_queue
        self.retry_after_s = max(1, math.ceil(retry_after_s))
