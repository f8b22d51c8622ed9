"""RadixIndex: property tests against a brute-force model, and table-driven edge cases."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvroute.cache_index.hashing import BlockHash, EngineBlockHash, hash_blocks
from kvroute.cache_index.radix import OverlapScores, RadixIndex, StoredBlock

# A universe of blocks: every path of 1..5 tokens over a 3-letter alphabet is a block whose parent
# is the path without its last token. Real chained hashes, so the index sees what production sees.
ALPHABET = (0, 1, 2)
MAX_DEPTH = 5
PATHS: list[tuple[int, ...]] = [
    p for n in range(1, MAX_DEPTH + 1) for p in itertools.product(ALPHABET, repeat=n)
]
HASH: dict[tuple[int, ...], BlockHash] = {p: hash_blocks(list(p), 1)[-1] for p in PATHS}
WORKERS = ("http://w0", "http://w1", "http://w2", "http://w3")


def ehash(worker: str, path: tuple[int, ...]) -> EngineBlockHash:
    """Engine hashes: w0-w2 share one scheme (as SGLang >= 0.5.9 does), w3 has its own."""
    h = HASH[path]
    return EngineBlockHash(-h if worker == "http://w3" else h ^ 0x5A5A)


def chain(parent: tuple[int, ...] | None, tokens: list[int]) -> list[tuple[int, ...]]:
    base = parent or ()
    return [base + tuple(tokens[: i + 1]) for i in range(len(tokens))]


def stored(worker: str, paths: list[tuple[int, ...]]) -> list[StoredBlock]:
    return [StoredBlock(HASH[p], ehash(worker, p)) for p in paths]


class Model:
    """Brute force: per worker an ordered dict of held paths (order = LRU, oldest first)."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.held: dict[str, dict[tuple[int, ...], None]] = {}

    def store(self, w: str, parent: tuple[int, ...] | None, paths: list[tuple[int, ...]]) -> None:
        held = self.held.setdefault(w, {})
        if parent is not None and parent not in held:
            return  # orphan: the worker does not hold the parent
        for p in paths:
            held[p] = None
        if self.capacity is not None:
            for p in reversed(paths):  # refresh, ancestors most recent
                del held[p]
                held[p] = None
            while len(held) > self.capacity:
                self.drop(w, next(iter(held)))

    def drop(self, w: str, path: tuple[int, ...]) -> int:
        held = self.held.get(w, {})
        gone = [q for q in held if q[: len(path)] == path]
        for q in gone:
            del held[q]
        return len(gone)

    def remove(self, w: str, paths: list[tuple[int, ...]]) -> int:
        return sum(self.drop(w, p) for p in paths if p in self.held.get(w, {}))

    def match(self, query: list[tuple[int, ...]]) -> dict[str, int]:
        out = {}
        for w, held in self.held.items():
            n = 0
            while n < len(query) and query[n] in held:
                n += 1
            if n:
                out[w] = n
        return out


paths_st = st.sampled_from(PATHS)
workers_st = st.sampled_from(WORKERS)
tokens_st = st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=MAX_DEPTH)


class RadixMachine(RuleBasedStateMachine):
    capacity: int | None = None

    @initialize()
    def setup(self) -> None:
        self.index = RadixIndex(self.capacity)
        self.model = Model(self.capacity)

    @rule(w=workers_st, parent=st.one_of(st.none(), paths_st), tokens=tokens_st)
    def store(self, w: str, parent: tuple[int, ...] | None, tokens: list[int]) -> None:
        room = MAX_DEPTH - len(parent or ())
        if room <= 0:
            return
        paths = chain(parent, tokens[:room])
        self.index.store(w, HASH[parent] if parent else None, stored(w, paths))
        self.model.store(w, parent, paths)

    @rule(w=workers_st, paths=st.lists(paths_st, max_size=4))
    def remove(self, w: str, paths: list[tuple[int, ...]]) -> None:
        got = self.index.remove(w, [ehash(w, p) for p in paths])
        assert got == self.model.remove(w, paths)

    @rule(w=workers_st)
    def clear(self, w: str) -> None:
        n = self.index.clear(w)
        assert n == len(self.model.held.get(w, {}))
        self.model.held.pop(w, None)
        if w in self.index.workers():
            self.model.held[w] = {}

    @rule(w=workers_st)
    def remove_worker(self, w: str) -> None:
        assert self.index.remove_worker(w) == len(self.model.held.pop(w, {}))
        assert w not in self.index.workers()

    @rule(leaf=paths_st, extra=st.sampled_from([None, (9, 9)]))
    def match(self, leaf: tuple[int, ...], extra: tuple[int, ...] | None) -> None:
        query = [leaf[: i + 1] for i in range(len(leaf))]
        hashes = [HASH[p] for p in query]
        want = self.model.match(query)
        assert self.index.match(hashes) == want
        assert self.index.match_walk(hashes) == want
        if extra is not None:  # not a chain: only the walk is defined for it
            assert self.index.match_walk([*hashes, BlockHash(12345)]) == want

    @invariant()
    def counts_agree(self) -> None:
        for w in WORKERS:
            held = self.model.held.get(w, {})
            assert self.index.block_count(w) == len(held)
            for p in held:
                assert self.index.our_hash(w, ehash(w, p)) == HASH[p]
        assert len(self.index) == len({p for held in self.model.held.values() for p in held})
        assert self.index.stats()["worker_blocks"] == sum(len(h) for h in self.model.held.values())


class RadixCapacityMachine(RadixMachine):
    capacity = 6


_settings = settings(
    max_examples=200, deadline=None, stateful_step_count=30, suppress_health_check=[HealthCheck.too_slow]
)
TestRadixProperties = RadixMachine.TestCase
TestRadixProperties.settings = _settings
TestRadixCapacityProperties = RadixCapacityMachine.TestCase
TestRadixCapacityProperties.settings = _settings


# ---------------------------------------------------------------------------- edge cases
def h(*path: int) -> BlockHash:
    return HASH[tuple(path)]


def blocks(w: str, *leaf: int) -> list[StoredBlock]:
    """The chain from the root to `leaf`."""
    return stored(w, [tuple(leaf[: i + 1]) for i in range(len(leaf))])


A, B = "http://a", "http://b"


@pytest.mark.parametrize(
    ("query", "want"),
    [
        ([], {}),  # empty prompt: nobody
        ([h(1)], {A: 1, B: 1}),  # both hold the first block
        ([h(1), h(1, 0), h(1, 0, 0)], {A: 3, B: 2}),  # A deeper than B
        ([h(1), h(1, 2)], {A: 1, B: 2}),  # they diverge after block 1
        ([h(2)], {}),  # miss at the first block
        ([h(1), h(1, 0), h(1, 0, 0), h(1, 0, 0, 0)], {A: 3, B: 2}),  # prompt longer than any cache
    ],
)
def test_match_table(query: list[BlockHash], want: dict[str, int]) -> None:
    idx = RadixIndex()
    idx.store(A, None, blocks(A, 1, 0, 0))
    idx.store(B, None, blocks(B, 1, 0))
    idx.store(B, h(1), stored(B, [(1, 2)]))
    got = idx.match(query)
    assert isinstance(got, OverlapScores)
    assert got == want
    assert idx.match_walk(query) == want


def test_remove_takes_the_workers_descendants_only() -> None:
    idx = RadixIndex()
    idx.store(A, None, blocks(A, 1, 0, 0))
    idx.store(B, None, blocks(B, 1, 0, 0))
    assert idx.remove(A, [ehash(A, (1, 0))]) == 2  # (1,0) and its child (1,0,0)
    assert idx.block_count(A) == 1 and idx.block_count(B) == 3
    assert idx.match([h(1), h(1, 0), h(1, 0, 0)]) == {A: 1, B: 3}
    # SGLang then reports the child's removal: ignored and counted, nothing breaks.
    assert idx.remove(A, [ehash(A, (1, 0, 0))]) == 0
    assert idx.stats()["stale_removes"] == 1
    assert idx.our_hash(A, ehash(A, (1, 0, 0))) is None
    assert idx.our_hash(B, ehash(B, (1, 0, 0))) == h(1, 0, 0)


@pytest.mark.parametrize(
    ("case", "run", "stat"),
    [
        ("unknown engine hash", lambda i: i.remove(A, [EngineBlockHash(777)]), "unknown_removes"),
        ("unknown worker", lambda i: i.remove("http://nobody", [EngineBlockHash(1)]), "unknown_removes"),
        ("orphan store", lambda i: i.store(A, h(2), blocks(A, 2, 0)[1:]), "orphan_blocks"),
    ],
)
def test_ignored_inputs_are_counted(case: str, run: object, stat: str) -> None:
    idx = RadixIndex()
    idx.store(A, None, blocks(A, 1, 0))
    before = (len(idx), idx.block_count(A))
    assert callable(run)
    run(idx)
    assert idx.stats()[stat] >= 1, case
    assert (len(idx), idx.block_count(A)) == before  # nothing changed


def test_store_is_idempotent_and_counts_new_blocks_only() -> None:
    idx = RadixIndex()
    idx.store(A, None, blocks(A, 1, 0))
    idx.store(A, None, blocks(A, 1, 0, 2))
    assert idx.block_count(A) == 3 and len(idx) == 3
    assert idx.stats()["stored_blocks"] == 3


def test_slot_reuse_after_remove_worker_leaks_nothing() -> None:
    idx = RadixIndex()
    idx.store(A, None, blocks(A, 1, 0))
    idx.store(B, None, blocks(B, 1))
    assert idx.remove_worker(A) == 2
    idx.store("http://c", None, blocks("http://c", 2))  # takes A's slot
    assert idx.match([h(1), h(1, 0)]) == {B: 1}
    assert idx.match([h(2)]) == {"http://c": 1}
    assert sorted(idx.workers()) == [B, "http://c"]
    assert len(idx) == 2


def test_clear_keeps_worker_registered() -> None:
    idx = RadixIndex()
    idx.store(A, None, blocks(A, 1, 0))
    idx.store(B, None, blocks(B, 1))
    assert idx.clear(A) == 2
    assert A in idx.workers() and idx.block_count(A) == 0
    assert idx.match([h(1), h(1, 0)]) == {B: 1}
    assert len(idx) == 1


def test_capacity_evicts_least_recent_leaves_first() -> None:
    idx = RadixIndex(capacity=4)
    idx.store(A, None, blocks(A, 1, 0, 0))  # 3 blocks
    idx.store(A, None, blocks(A, 2, 0))  # 5 > 4: the oldest leaf (1,0,0) goes
    assert idx.block_count(A) == 4
    assert idx.match([h(1), h(1, 0), h(1, 0, 0)]) == {A: 2}
    idx.touch(A, [h(1), h(1, 0)])  # (1,...) now more recent than (2,...)
    idx.store(A, h(1, 0), stored(A, [(1, 0, 1)]))  # the oldest is now (2,0)
    assert idx.match([h(2), h(2, 0)]) == {A: 1}
    assert idx.stats()["evicted_blocks"] == 2


def test_per_worker_capacity_and_shrinking_it() -> None:
    idx = RadixIndex()
    idx.add_worker(A, capacity=10)
    idx.store(A, None, blocks(A, 1, 0, 0, 0))
    idx.store(B, None, blocks(B, 1, 0, 0, 0))
    assert idx.set_capacity(A, 2) == 2  # evicts the two deepest
    assert idx.match([h(1), h(1, 0), h(1, 0, 0), h(1, 0, 0, 0)]) == {A: 2, B: 4}
    with pytest.raises(ValueError):
        idx.set_capacity(A, 0)


def test_match_does_not_touch_recency() -> None:
    idx = RadixIndex(capacity=3)
    idx.store(A, None, blocks(A, 1))
    idx.store(A, None, blocks(A, 2))
    idx.store(A, None, blocks(A, 0))
    idx.match([h(1)])  # a read: (1,) stays the least recent
    idx.store(A, None, blocks(A, 2, 2))  # a 4th block: the least recent, (1,), goes
    assert idx.match([h(1)]) == {}


def test_engine_hash_schemes_may_differ_between_workers() -> None:
    idx = RadixIndex()
    # A and B name block (1,) with the same engine hash 5; for B, 5 also names (2,) elsewhere.
    idx.store(A, None, [StoredBlock(h(1), EngineBlockHash(5))])
    idx.store(B, None, [StoredBlock(h(2), EngineBlockHash(5))])
    assert idx.our_hash(A, EngineBlockHash(5)) == h(1)
    assert idx.our_hash(B, EngineBlockHash(5)) == h(2)
    assert idx.remove(B, [EngineBlockHash(5)]) == 1
    assert idx.match([h(1)]) == {A: 1} and idx.match([h(2)]) == {}


def test_many_workers_use_wide_masks() -> None:
    idx = RadixIndex()
    names = [f"http://w{i}" for i in range(300)]
    for i, w in enumerate(names):
        idx.store(w, None, [StoredBlock(h(1), EngineBlockHash(1))])
        if i % 2:
            idx.store(w, h(1), [StoredBlock(h(1, 0), EngineBlockHash(2))])
    got = idx.match([h(1), h(1, 0)])
    assert got == {w: 2 if i % 2 else 1 for i, w in enumerate(names)}
    assert idx.remove(names[299], [EngineBlockHash(1)]) == 2
    assert names[299] not in idx.match([h(1)])


def test_wide_fan_out_with_churn_stays_consistent() -> None:
    # One system prompt block with 40 children stored, removed and stored again across two
    # workers: exercises the branch sets and their lazy pruning.
    idx = RadixIndex()
    root = BlockHash(1)
    kids = [BlockHash(100 + i) for i in range(40)]
    for w in (A, B):
        idx.store(w, None, [StoredBlock(root, EngineBlockHash(1))])
    for rnd in range(3):
        for i, k in enumerate(kids):
            idx.store(A if i % 2 else B, root, [StoredBlock(k, EngineBlockHash(k + 1000))])
        for i, k in enumerate(kids):
            if (i + rnd) % 3:
                assert idx.remove(A if i % 2 else B, [EngineBlockHash(k + 1000)]) == 1
    alive = [(i, k) for i, k in enumerate(kids) if not (i + 2) % 3]
    for i, k in enumerate(kids):
        want = {A: 1, B: 1}
        if any(j == i for j, _ in alive):
            want[A if i % 2 else B] = 2
        assert idx.match([root, k]) == want
    assert idx.block_count(A) + idx.block_count(B) == 2 + len(alive)
    assert idx.clear(A) == 1 + sum(1 for i, _ in alive if i % 2)
    assert idx.remove(B, [EngineBlockHash(1)]) == 1 + sum(1 for i, _ in alive if not i % 2)
    assert len(idx) == 0


def test_inconsistent_chains_still_clear_cleanly() -> None:
    # A caller claims block (1,0) under two different parents: the index must still forget A
    # completely (a leaked bit would be misattributed once the slot is reused).
    idx = RadixIndex()
    idx.store(A, None, blocks(A, 1, 0))
    idx.store(B, None, blocks(B, 2))
    idx.store(B, h(2), stored(B, [(1, 0)]))  # (1,0) already exists under (1,)
    idx.remove(A, [ehash(A, (1,))])  # drops (1,) and (1,0) for A
    idx.store(A, None, blocks(A, 2))
    idx.store(A, h(2), stored(A, [(1, 0)]))
    assert idx.remove_worker(A) == 2
    idx.store("http://c", None, blocks("http://c", 0))  # reuses A's slot
    assert idx.match([h(2), h(1, 0)]) == {B: 2}
    assert idx.block_count("http://c") == 1
