"""KV transfer between engines' paged pools (PD disaggregation): descriptors, transports, the copy kernel.

A prefill engine describes its pool once (`PoolDescriptor`: shapes, page size, owner process, and on CUDA
the pool's IPC handles); per request it lends the prompt's page ids. The decode engine opens the source
pool through a `KvTransport` and copies those pages into pages of its own pool with one gather/scatter
pass per K and V (`copy_pages`: a Triton kernel on CUDA, torch indexing on the CPU).

Transports, chosen per source by `open_source`:
- `LocalTransport`: the source pool lives in this process (a `PoolDirectory` shared by the engines of one
  process, passed in like the simulator's bootstrap registry): device-to-device on the same GPU, or CPU.
- `CudaIpcTransport`: the source pool belongs to another process on this host: its K/V tensors are
  rebuilt from CUDA IPC handles (torch's own reductions, opened once per pool), then the same kernel.
A cross-GPU transport (NCCL, NIXL) is one more class with the `KvTransport` shape: it receives the same
descriptor and page lists and fills the same destination pages.

Ordering: the prefill side lends pages only after the step that wrote them has finished on the host
(its sampling read the logits back); the decode side synchronises its copy before it tells the prefill
side to release them, so neither side needs the other's CUDA stream.
"""

from __future__ import annotations

import array
import base64
import io
import logging
import os
import pickle
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from kvroute.engines.gpu.kv_pool import KVPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolDescriptor:
    """What a decode engine must know of a prefill engine's pool to copy from it (JSON-safe)."""

    pool_id: str
    pid: int
    device: str
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    ipc: str | None = None  # base64 of the pickled (k, v) CUDA tensors (torch IPC handles); None on CPU

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolDescriptor:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def check_compatible(self, dst: KVPool) -> None:
        """Raise ValueError when the source pool's pages cannot be copied into `dst` as they are."""
        k = dst.k
        mine = (dst.page_size, k.shape[0], k.shape[2], k.shape[3], str(k.dtype).removeprefix("torch."))
        theirs = (self.page_size, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)
        if mine != theirs:
            names = "page_size, layers, kv heads, head dim, dtype"
            raise ValueError(f"KV pools differ ({names}): prefill {theirs}, decode {mine}")


def describe_pool(pool: KVPool, pool_id: str, with_ipc: bool) -> PoolDescriptor:
    ipc = None
    if with_ipc and pool.k.is_cuda:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing.reductions as reductions

        reductions.init_reductions()  # registers torch's CUDA-tensor pickling with ForkingPickler
        buf = io.BytesIO()
        try:
            ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump((pool.k, pool.v))
            ipc = base64.b64encode(buf.getvalue()).decode()
        except (
            RuntimeError,
            OSError,
            pickle.PicklingError,
        ) as exc:  # no CUDA IPC here: engines of this process still copy
            log.warning(
                "KV pool %s: no CUDA IPC handles (%r); other processes cannot copy from it", pool_id, exc
            )
    return PoolDescriptor(
        pool_id=pool_id,
        pid=os.getpid(),
        device=str(pool.k.device),
        page_size=pool.page_size,
        num_layers=pool.k.shape[0],
        num_kv_heads=pool.k.shape[2],
        head_dim=pool.k.shape[3],
        dtype=str(pool.k.dtype).removeprefix("torch."),
        ipc=ipc,
    )


class PoolDirectory:
    """The KV pools of this process by id: how engines of one process find each other's pools."""

    def __init__(self) -> None:
        self._pools: dict[str, KVPool] = {}

    def register(self, pool: KVPool) -> str:
        pool_id = uuid.uuid4().hex
        self._pools[pool_id] = pool
        return pool_id

    def unregister(self, pool_id: str) -> None:
        self._pools.pop(pool_id, None)

    def get(self, pool_id: str) -> KVPool | None:
        return self._pools.get(pool_id)


@dataclass(frozen=True, slots=True)
class SourceKv:
    """An opened source pool: the K and V tensors ``[layers, pages * page_size, Hkv, D]`` to read."""

    k: torch.Tensor
    v: torch.Tensor
    page_size: int


class KvTransport(Protocol):
    """Moves lent prompt pages into a destination pool. One instance per decode engine."""

    name: str

    def accepts(self, desc: PoolDescriptor) -> bool:
        """Whether this transport can reach the described pool from here."""
        ...

    def transfer(
        self, desc: PoolDescriptor, src_pages: Sequence[int], dst: KVPool, dst_pages: Sequence[int]
    ) -> int:
        """Copy the pages (all layers, K and V) and wait until the copy is complete; returns bytes moved."""
        ...


def page_bytes(pool: KVPool) -> int:
    """Bytes of one page over all layers, K and V."""
    k = pool.k
    return 2 * k.shape[0] * pool.page_size * k.shape[2] * k.shape[3] * k.element_size()


def copy_pages(
    src: SourceKv,
    src_pages: Sequence[int],
    dst: KVPool,
    dst_pages: Sequence[int],
    use_triton: bool | None = None,
) -> int:
    """Copy whole pages ``src_pages[i] -> dst_pages[i]`` for every layer, K and V; returns bytes moved.

    Enqueued on the current stream (CUDA) and not synchronised: callers that hand the pages back must
    synchronise first (`KvTransport.transfer` does).
    """
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
    if src.page_size != dst.page_size:
        raise ValueError(f"page sizes differ: source {src.page_size}, destination {dst.page_size}")
    n = len(src_pages)
    if n == 0:
        return 0
    dev = dst.k.device
    if use_triton is None:
        use_triton = dev.type == "cuda"
    # Both page lists in one upload; array.array converts a list of ints ~50x faster than torch.tensor.
    buf = array.array("i", src_pages)
    buf.extend(dst_pages)
    table = torch.frombuffer(buf, dtype=torch.int32).to(dev, non_blocking=False)
    sp, dp = table[:n], table[n:]
    if use_triton:
        from kvroute.engines.gpu.kernels import copy_kv_pages

        copy_kv_pages(src.k, src.v, dst.k, dst.v, sp, dp, dst.page_size)
    else:
        ps = dst.page_size
        offs = torch.arange(ps, device=dev, dtype=torch.int64)
        src_rows = (sp.to(torch.int64)[:, None] * ps + offs).flatten()
        dst_rows = (dp.to(torch.int64)[:, None] * ps + offs).flatten()
        dst.k[:, dst_rows] = src.k[:, src_rows]
        dst.v[:, dst_rows] = src.v[:, src_rows]
    return n * page_bytes(dst)


def _sync(dst: KVPool) -> None:
    if dst.k.is_cuda:
        torch.cuda.current_stream(dst.k.device).synchronize()


class LocalTransport:
    """Source pool in this process: device-to-device (or CPU) through the shared `PoolDirectory`."""

    name = "local"

    def __init__(self, pools: PoolDirectory) -> None:
        self.pools = pools

    def accepts(self, desc: PoolDescriptor) -> bool:
        return desc.pid == os.getpid() and self.pools.get(desc.pool_id) is not None

    def transfer(
        self, desc: PoolDescriptor, src_pages: Sequence[int], dst: KVPool, dst_pages: Sequence[int]
    ) -> int:
        pool = self.pools.get(desc.pool_id)
        if pool is None:
            raise LookupError(f"KV pool {desc.pool_id} is not in this process")
        if pool.k.device != dst.k.device:
            raise ValueError(f"pools on {pool.k.device} and {dst.k.device}: needs a cross-device transport")
        n = copy_pages(SourceKv(pool.k, pool.v, pool.page_size), src_pages, dst, dst_pages)
        _sync(dst)
        return n


class CudaIpcTransport:
    """Source pool in another process on the same GPU: opened once from its CUDA IPC handles."""

    name = "cuda_ipc"

    def __init__(self) -> None:
        self._open: dict[str, SourceKv] = {}

    def accepts(self, desc: PoolDescriptor) -> bool:
        return desc.ipc is not None and desc.pid != os.getpid() and torch.cuda.is_available()

    def open(self, desc: PoolDescriptor) -> SourceKv:
        src = self._open.get(desc.pool_id)
        if src is None:
            if desc.ipc is None:
                raise ValueError("the prefill pool has no CUDA IPC handle")
            import torch.multiprocessing  # noqa: F401  (the rebuild functions the pickle names)

            k, v = pickle.loads(base64.b64decode(desc.ipc))
            src = SourceKv(k, v, desc.page_size)
            self._open[desc.pool_id] = src
        return src

    def transfer(
        self, desc: PoolDescriptor, src_pages: Sequence[int], dst: KVPool, dst_pages: Sequence[int]
    ) -> int:
        src = self.open(desc)
        if src.k.device != dst.k.device:
            raise ValueError(f"pools on {src.k.device} and {dst.k.device}: needs a cross-device transport")
        n = copy_pages(src, src_pages, dst, dst_pages)
        _sync(dst)
        return n

    def close(self) -> None:
        self._open.clear()


def pick_transport(transports: Sequence[KvTransport], desc: PoolDescriptor) -> KvTransport:
    for t in transports:
        if t.accepts(desc):
            return t
    raise LookupError(
        f"no KV transport reaches pool {desc.pool_id} (process {desc.pid}, {desc.device}) from process "
        f"{os.getpid()}: tried {', '.join(t.name for t in transports)}"
    )
