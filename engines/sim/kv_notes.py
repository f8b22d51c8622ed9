"""Prefix-cache notes -> SGLang KV events, in the shape of the SGLang version being imitated."""

from __future__ import annotations

from collections.abc import Sequence

from kvroute.cache_index.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from kvroute.engines.prefix_cache import CacheCleared, CacheNote, PagesRemoved, PageStored


def notes_to_events(notes: Sequence[CacheNote], page_size: int, merge_chains: bool) -> list[KvEvent]:
    """One `BlockStored` per page (0.5.10), or with `merge_chains` one per run of consecutive pages of a
    chain (0.5.23's map form); one `BlockRemoved` per evicted page; `AllBlocksCleared` on a flush."""
    out: list[KvEvent] = []
    run: list[PageStored] = []

    def flush_run() -> None:
        if run:
            toks: list[int] = []
            for p in run:
                toks.extend(p.token_ids)
            out.append(
                BlockStored(
                    block_hashes=tuple(p.block_hash for p in run),
                    parent_block_hash=run[0].parent_hash,
                    token_ids=tuple(toks),
                    block_size=page_size,
                    lora_id=None,
                    medium="GPU",
                )
            )
            run.clear()

    for note in notes:
        if isinstance(note, PageStored):
            if run and (not merge_chains or note.parent_hash != run[-1].block_hash):
                flush_run()
            run.append(note)
            continue
        flush_run()
        if isinstance(note, PagesRemoved):
            out.extend(BlockRemoved(block_hashes=(h,), medium="GPU") for h in note.block_hashes)
        elif isinstance(note, CacheCleared):
            out.append(AllBlocksCleared())
    flush_run()
    return out
