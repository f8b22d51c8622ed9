"""Paged KV pool: one preallocated K and V tensor per engine, cut into pages, with a free-page allocator.

Token slot ``s`` of page ``p`` lives at row ``p * page_size + s`` of ``k[layer]`` / ``v[layer]``
(shape ``[num_pages * page_size, num_kv_heads, head_dim]``), so kernels address a token through the page
table alone. Sharing and eviction of pages are the prefix cache's business; the pool only hands out and
takes back page ids.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from kvroute.engines.gpu.config import ModelConfig


class OutOfPages(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


class PageAllocator:
    """Free list of page ids (no storage; torch-free so the scheduler is testable anywhere).

    Invariant: every page id in ``[0, num_pages)`` is either free (in the free list, exactly once) or owned
    by a caller that will ``free`` it exactly once.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._is_free = bytearray(b"\x01" * num_pages)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for p in out:
            self._is_free[p] = 0
        return out

    def free(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise RuntimeError(f"page {p} freed twice")
            self._is_free[p] = 1
            self._free.append(p)

    def slots(self, pages: Sequence[int], start: int, end: int) -> list[int]:
        """Pool rows of token positions ``[start, end)`` of a sequence whose page table is ``pages``."""
        ps = self.page_size
        return [pages[t // ps] * ps + t % ps for t in range(start, end)]


class KVPool(PageAllocator):
    """K/V storage for every layer (``k[layer]``: ``[num_pages * page_size, Hkv, D]``) plus its allocator."""

    def __init__(
        self, cfg: ModelConfig, num_pages: int, page_size: int, device: object, dtype: object
    ) -> None:
        import torch

        super().__init__(num_pages, page_size)
        self.device = torch.device(device)  # type: ignore[call-overload]
        shape = (cfg.num_layers, num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=self.device)  # type: ignore[arg-type]
        self.v = torch.empty(shape, dtype=dtype, device=self.device)  # type: ignore[arg-type]

    @staticmethod
    def pages_for_bytes(cfg: ModelConfig, page_size: int, nbytes: int, dtype_bytes: int) -> int:
        return max(1, nbytes // (cfg.kv_bytes_per_token(dtype_bytes) * page_size))
