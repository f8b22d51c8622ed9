"""`kv_aware`: route to the worker where the request's TTFT is lowest, knowing what each worker has cached.

The cost estimates TTFT in blocks of prefill work (a block = block_size tokens through the model's
linear layers; finite, lower is better), for worker w and a prompt of P blocks:

    cost(w) = own_prefill(w) + queue_weight * pending_prefill_blocks(w) + decode_weight * decode_load(w)
              + reuse_weight * (P - indexed(w)) + fill_weight * n * fill(w)   (+ guard_penalty if hot)
    own_prefill(w) = n * (1 + (overlap(w) + n / 2) * block_size / attention_tokens),  n = P - overlap(w)

- own_prefill: the request's own uncached prefill. Attention makes a new token cost more the longer
  the context before it (H100 / Llama-3-8B: an 8k chunk after 32k cached tokens costs 2.6x one after
  none), so a deep cache hit saves more than its share of tokens; `attention_tokens` is the context at
  which a token's attention costs as much as its linear layers (7k-12.5k on that profile, 8192; 0:
  ignore).
- pending_prefill_blocks(w): the prefill queued ahead of it (uncached prompt tokens routed to w with
  no first token yet / block_size), less what the oldest of them has drained since it started (at the
  worker's prefill speed, learnt from first tokens): a worker about to finish a long prompt is nearly
  free, one that just took a short one is not. queue_weight 1 = the FCFS wait.
- decode_load(w): active KV blocks (router count, floored by the engine's usage). Decode only slows a
  prefill step by its attention over the running contexts (~1% per 100 active 64-token blocks on
  that profile), hence a small decode_weight (0.01).
- reuse_weight * (P - indexed(w)): what a miss costs the *fleet*: recomputing a prefix another worker
  holds (event-confirmed blocks only) duplicates it and spends prefill capacity later requests queue
  behind. Without it the cost is greedy per request and scatters conversations whenever the owner has
  a queue (Mooncake slice 0: 87% of the reuse ceiling without it, 92% with 2.5).
- overlap(w): leading prompt blocks w holds = max(event-fed index match, in-flight match). The in-flight
  match counts prompts routed to w and not finished as held there (a burst arrives before any event);
  off with `predict_inflight=False`. It counts once the in-flight prompts have been admitted to a
  prefill step: behind at least `step_tokens` of queued prefill, or when the newest was routed there at
  least one engine step ago (the worker's step time measured from its streams, `admit_s` until then).
  Sooner, the request would be admitted in the same prefill step and recompute the prefix (SGLang, the
  sim). Once it counts it also earns reuse credit (`inflight_credit`): a burst on a new shared prefix
  then queues behind its first prefill and hits, instead of copying it to every worker (shared-prefix
  groups: 83% -> see RESULTS of requests on their group's worker).
- Hot-spot guard: w is hot when its requests in flight exceed `guard_factor * fleet_mean +
  guard_margin_requests` (a burst of shared-prefix requests has ~0 uncached work, so only the count
  shows the pile-up), or, when `guard_margin_blocks` > 0, when its load (pending prefill + decode_weight
  * active blocks) exceeds `guard_factor * fleet_mean + guard_margin_blocks` (off by default: the cost
  already prices queued prefill, and on long prompts that test fired on most requests and drove them
  off their cache). Hot workers rank after every cool one. `guard_factor = 0` disables the guard.
- Hot prefix: when the least queue on the holders of the prompt's deepest confirmed prefix costs more
  than one prefill of that prefix elsewhere, and its own requests are in flight there, the prefix's
  reuse credit is void for this request (every worker charged as a holder): it spreads while copying
  wins, and stops when the holders' queue falls below a copy.
- fill_weight * n * fill(w): placement. Each new block evicts one once w's cache is full (fill =
  blocks held / KV capacity, or / the fullest worker's): new prefixes go to the emptiest caches, so
  an idle fleet's ties no longer all land on the first worker.
- temperature T: 0 picks the argmin (ties: more cached blocks, fewer requests in flight, fewer recent
  placements, fewer blocks held, then candidate order; the reason names the deciding term). T > 0 samples a
  cool worker with probability softmax(-cost / T) (T in blocks), from a seeded RNG when `seed` is set.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kvroute.router.policies.base import OverlapSource, PolicyBase, PolicyContext, SharingSource
from kvroute.router.policies.common import DECISION_SCORES, config_from_params, require
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerScore

# A candidate's row, built per worker per request (a plain tuple: cheapest to build in a hot loop):
# (cost, -overlap, requests in flight, recent placements, held blocks, candidate order, url, overlap,
#  indexed, inflight, new_prefill, pending, decode, block load, guard penalty, reuse penalty,
#  placement penalty). Sorting on the first six gives the ranking: lower cost, then more cached blocks,
#  then fewer requests in flight, fewer recent placements, fewer blocks held, and candidate order last.
_Row = tuple[
    float, int, int, float, float, int, str, int, int, int, float, float, float, float, float, float, float
]
_COST: Final = 0
_REQS: Final = 2
_RECENT: Final = 3
_HELD: Final = 4
_ORDER: Final = 5
_URL: Final = 6
_OVERLAP: Final = 7
_LOAD: Final = 13
_PENALTY: Final = 14
_REUSE: Final = 15
_PLACE: Final = 16
_TIE_KEYS: Final = (
    (1, "more cached blocks"),
    (_REQS, "fewer requests in flight"),
    (_RECENT, "fewer recent placements"),
    (_HELD, "fewer blocks held"),
    (_ORDER, "candidate order"),
)


# The hot-prefix test of one request: (least queue among the holders of the deepest event-confirmed
# prefix, in blocks (inf: none held), the cost of copying that prefix elsewhere, whether it fired).
_Replication = tuple[float, float, bool]
_NO_REPLICATION: Final[_Replication] = (math.inf, 0.0, False)


def _key(r: _Row) -> tuple[float, int, int, float, float, int]:
    return (r[0], r[1], r[2], r[3], r[4], r[5])


@dataclass(frozen=True)
class KvAwareConfig:
    # Cost of one active KV block relative to one block of prefill; 0 ignores decode. From the H100
    # Llama-3-8B profile: decode attention adds ~47 ns per active KV token to each prefill step of
    # ~180 ms (8k tokens), ~1% per 100 active 64-token blocks: 0.01. (It was 0.1, sized on ITL: on
    # Mooncake's long prompts the running contexts then outweighed the cache and scattered sessions.)
    decode_weight: float = 0.01
    # Weight of the prefill queued on the worker (the newcomer waits behind it). 1: the FCFS TTFT
    # estimate; < 1 for engines that let a request sharing a queued prefix wait and reuse it (SGLang's
    # LPM schedule policy), where the queue costs the newcomer less than recomputing elsewhere.
    queue_weight: float = 1.0
    normalize_by_capacity: bool = False  # scale decode load by mean KV capacity / worker's (mixed GPUs)
    guard_factor: float = 1.5  # hot if load > factor * fleet mean + margin; 0 disables the guard
    guard_margin_blocks: float = 0.0  # slack of the block-load test, in blocks; 0 disables that test
    guard_margin_requests: float = 8.0  # absolute slack of the requests-in-flight test, in requests
    temperature: float = 0.0  # softmax temperature in blocks; 0: deterministic argmin
    seed: int | None = None  # RNG seed for temperature > 0 (tests); None: seeded from the OS
    predict_inflight: bool = True  # count in-flight prompts as held by their worker (bursts)
    # Fleet cost of a miss, per prompt block the worker lacks in its event-confirmed cache (on top of
    # its own prefill): 0 is the greedy per-request TTFT. 2.5 from a Mooncake sweep over three slices
    # (share of the reuse ceiling on the worst slice: 1.5: 88%, 2: 89%, 2.5: 90%, 3: 90% with a worse
    # balance; 0 gives 87% on the first slice); mean TTFT moves by < 5% over 1.5..3.
    reuse_weight: float = 2.5
    # Context (tokens) at which a new token's attention costs as much as its linear layers. H100
    # Llama-3-8B profile: linear 21.8 us/token, attention 3.1 ns per (new, prior) token pair at 2k of
    # context down to 1.7 ns at 32k, i.e. 7k..12.5k. 8192: on three Mooncake slices 91-93% of the
    # reuse ceiling (12288: 89.7-93%), mean TTFT within 2%.
    attention_tokens: float = 8192.0
    # The engines' prefill budget per step (SGLang's chunked_prefill_size; 8192 on an H100). A request
    # sent to a worker with less prefill queued than this is admitted in the same step as the prompts in
    # flight there, and recomputes their unprefilled prefix (SGLang and the sim both do): in-flight
    # blocks count as held only behind a queue of at least this many tokens. 0: always (bursts pile up).
    step_tokens: int = 8192
    # Seconds after which a prompt routed to a worker has been admitted to a prefill step, until the
    # worker's streams measured its step time (then one step): SGLang on an H100 steps every 10-30 ms.
    admit_s: float = 0.03
    # Whether in-flight blocks that count (admitted, see above) also earn the reuse credit that
    # event-confirmed blocks earn: the prompt will be in that worker's cache when the newcomer runs.
    inflight_credit: bool = True
    # Cost of placing one new block on a worker whose cache is full, relative to one block of prefill:
    # each new block evicts one, whose later reuse is lost (`fill_weight * new blocks * fill(w)`, fill =
    # blocks held / KV capacity, or / the fullest worker's when capacities are unknown). It spreads new
    # prefixes over the fleet's empty caches instead of tying on worker 0; 0 disables it. 0.5: an LRU
    # victim is less likely to be reused than a fresh prefix; a full-cache placement then costs as much
    # as half the prompt queued elsewhere.
    fill_weight: float = 0.5
    # Half-life (s) of the count of requests recently placed on each worker, the last tie-breaker
    # before candidate order (a quiet fleet's short prompts, events not yet in); 0: count forever.
    placement_half_life_s: float = 30.0
    # Hot-prefix replication: when the least prefill queued on the workers holding the prompt's deepest
    # prefix (queue_weight x blocks) exceeds the cost of prefilling that prefix on another worker, the
    # reuse credit of the prefix is void for this request, so the per-request TTFT decides and the prefix
    # is copied where that is faster. No threshold: the holders' queue against one prefill of the prefix.
    replicate: bool = True

    def __post_init__(self) -> None:
        for name in (
            "decode_weight",
            "queue_weight",
            "guard_factor",
            "guard_margin_blocks",
            "guard_margin_requests",
            "temperature",
            "attention_tokens",
            "reuse_weight",
            "step_tokens",
            "admit_s",
            "fill_weight",
            "placement_half_life_s",
        ):
            v = getattr(self, name)
            require(math.isfinite(v) and v >= 0, "kv_aware", f"{name} must be finite and >= 0, got {v}")


class KvAwarePolicy(PolicyBase):
    """Scores on the event-fed RadixIndex (+ in-flight prompts); see the module docstring for the cost.

    Mutable state: the sampling RNG, advanced by `select` when temperature > 0, and the decayed count
    of recent placements per worker, advanced by `on_routed` (read, never written, by `select`).
    """

    name = "kv_aware"

    def __init__(
        self,
        config: KvAwareConfig,
        kv_index: OverlapSource,
        inflight: OverlapSource | None,
        block_counts: Callable[[str], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._index = kv_index
        self._inflight = inflight if config.predict_inflight else None
        self._block_counts = block_counts
        self._sharing = inflight if isinstance(inflight, SharingSource) else None
        self._clock = clock
        self._rng = _random.Random(config.seed)
        self._placed: dict[str, tuple[float, float]] = {}  # url -> (decayed count, at)

    def on_routed(self, request: RoutingRequest, worker: Worker) -> None:
        now = self._clock()
        self._placed[worker.url] = (self._recent(worker.url, now) + 1.0, now)

    def on_worker_removed(self, url: str) -> None:
        self._placed.pop(url, None)

    def _recent(self, url: str, now: float) -> float:
        entry = self._placed.get(url)
        if entry is None:
            return 0.0
        count, at = entry
        half = self.config.placement_half_life_s
        return count * 0.5 ** ((now - at) / half) if half > 0 and now > at else count

    def _rows(self, request: RoutingRequest, candidates: Sequence[Worker]) -> tuple[list[_Row], _Replication]:
        """Every candidate's cost and its ingredients, best first, and the hot-prefix test. One tight pass:
        this runs per request over the whole fleet, so loads are read inline rather than through the
        helpers."""
        c = self.config
        bs = request.block_size
        hashes = request.block_hashes
        indexed = self._index.match(hashes) if hashes else {}
        inflight = self._inflight.match(hashes) if (hashes and self._inflight is not None) else {}
        prompt_blocks = request.prompt_tokens / bs
        attn = bs / c.attention_tokens if c.attention_tokens > 0 else 0.0
        batch = c.step_tokens
        normalize = c.normalize_by_capacity
        caps = [w.max_total_tokens / bs for w in candidates if w.max_total_tokens] if normalize else []
        mean_cap = sum(caps) / len(caps) if caps else 0.0
        counts = self._block_counts
        fill_w = c.fill_weight
        now = self._clock()
        placed = self._placed
        qw = c.queue_weight
        admit_default = c.admit_s
        credit_inflight = c.inflight_credit
        sharing = self._sharing
        deepest = 0  # the deepest event-confirmed prefix, and the least queue among its holders
        holders_queue = math.inf
        best_holder = ""
        rows: list[_Row] = []
        for i, w in enumerate(candidates):
            ld = w.load
            url = w.url
            ov_i, ov_f = indexed.get(url, 0), inflight.get(url, 0)
            queued: float = ld.pending_prefill_tokens
            if queued and ld.head_tokens and ld.prefill_tokens_per_s:
                # the head of the queue has been prefilling since it started: take off what has drained
                queued -= min(ld.head_tokens, ld.prefill_tokens_per_s * (now - ld.head_started_at))
            if ov_f > ov_i and queued < batch:
                step = ld.step_s or admit_default
                # Something was routed here within the last step: the prefix counts only if a prompt
                # holding it came earlier (its prefill step has started; a newcomer queues behind it).
                if now - ld.last_routed_at < step and (
                    sharing is None or not sharing.holding_before(url, hashes[ov_f - 1], ov_f, now - step)
                ):
                    ov_f = ov_i  # admitted in the same step as the in-flight prompt: recomputed, not reused
            overlap = ov_i if ov_i >= ov_f else ov_f
            cr = overlap if credit_inflight else ov_i  # blocks earning reuse credit
            pending = queued / bs
            decode = float(ld.active_blocks)
            cap = w.max_total_tokens / bs if w.max_total_tokens else 0.0
            held = float(counts(url)) if counts is not None else 0.0
            if cap and ld.engine_token_usage is not None:
                used = ld.engine_token_usage * cap
                decode = max(decode, used)  # engine poll as a floor
                held = max(held, used)
            load = pending + c.decode_weight * decode
            reqs = max(ld.in_flight, (ld.engine_running or 0) + (ld.engine_queued or 0))
            if normalize and cap and mean_cap:
                decode *= mean_cap / cap
            raw_new = prompt_blocks - overlap if prompt_blocks > overlap else 0.0
            new_prefill = raw_new * (1.0 + (overlap + 0.5 * raw_new) * attn) if attn else raw_new
            reuse = c.reuse_weight * (prompt_blocks - cr) if prompt_blocks > cr else 0.0
            if cr >= deepest and cr:
                if cr > deepest:
                    deepest, holders_queue = cr, math.inf
                if qw * pending < holders_queue:
                    holders_queue, best_holder = qw * pending, url
            # fill: blocks held / capacity; relative to the fullest worker below when capacity is unknown
            place = raw_new * min(1.0, held / cap) if cap else -raw_new * held
            cost = new_prefill + qw * pending + c.decode_weight * decode + reuse
            recent = placed.get(url)
            rows.append(
                (
                    cost,
                    -overlap,
                    reqs,
                    self._recent(url, now) if recent is not None else 0.0,
                    held,
                    i,
                    url,
                    overlap,
                    ov_i,
                    ov_f,
                    new_prefill,
                    pending,
                    decode,
                    load,
                    0.0,
                    reuse,
                    place,
                )
            )
        rep = _NO_REPLICATION
        if deepest and c.reuse_weight > 0 and c.replicate:
            # Copying the prefix to another worker costs one prefill of it there; not copying costs the
            # queue on its holders, which grows with the prefix's own traffic. When that queue costs
            # more, and requests sharing the prefix are in flight on the holder (the queue is its
            # traffic, not one conversation's next turn), the reuse credit of that prefix is void:
            # every worker is charged as if it held it, the per-request TTFT decides and it spreads.
            copy = deepest * (1.0 + 0.5 * deepest * attn)
            live = self._sharing is not None and self._sharing.holding(best_holder, hashes[deepest - 1]) > 0
            rep = (holders_queue, copy, live and holders_queue > copy)
            if rep[2]:
                rows = self._void_reuse(rows, deepest, prompt_blocks)
        if fill_w > 0:
            rows = self._add_placement(rows, fill_w)
        if c.guard_factor > 0 and len(rows) > 1:
            rows = self._guard(rows)
        rows.sort(key=_key)
        return rows, rep

    def _void_reuse(self, rows: list[_Row], deepest: int, prompt_blocks: float) -> list[_Row]:
        """Charge every worker the reuse penalty of the prompt past the `deepest` held prefix only."""
        rw = self.config.reuse_weight
        floor = rw * (prompt_blocks - deepest) if prompt_blocks > deepest else 0.0
        out: list[_Row] = []
        for r in rows:
            reuse = r[_REUSE]
            if reuse > floor:
                r = (r[_COST] - reuse + floor, *r[1:_REUSE], floor, r[_PLACE])
            out.append(r)
        return out

    @staticmethod
    def _add_placement(rows: list[_Row], fill_w: float) -> list[_Row]:
        """cost += fill_weight * new blocks * fill. A row's `place` slot holds new blocks x fill when the
        capacity is known, else -(new blocks x held), normalised here by the fullest worker's hold."""
        top = max(r[_HELD] for r in rows)
        out: list[_Row] = []
        for r in rows:
            place = r[_PLACE]
            if place < 0:
                place = -place / top if top > 0 else 0.0
            place *= fill_w
            out.append((r[_COST] + place, *r[1:_PLACE], place) if place else r)
        return out

    def _guard(self, rows: list[_Row]) -> list[_Row]:
        c = self.config
        n = len(rows)
        lim_b = (
            c.guard_factor * sum(r[_LOAD] for r in rows) / n + c.guard_margin_blocks
            if c.guard_margin_blocks > 0
            else math.inf
        )
        lim_r = c.guard_factor * sum(r[_REQS] for r in rows) / n + c.guard_margin_requests
        hot = [j for j, r in enumerate(rows) if r[_LOAD] > lim_b or r[_REQS] > lim_r]
        if hot and len(hot) < n:
            hot_set = set(hot)
            cool_max = max(r[_COST] for j, r in enumerate(rows) if j not in hot_set)
            # Lift the cheapest hot worker just above the dearest cool one: hot ones rank last.
            penalty = max(0.0, cool_max - min(rows[j][_COST] for j in hot)) + 1.0
            for j in hot:
                r = rows[j]
                rows[j] = (r[_COST] + penalty, *r[1:_PENALTY], penalty, r[_REUSE], r[_PLACE])
        return rows

    def _score(self, r: _Row, prompt_blocks: float, rep: _Replication) -> WorkerScore:
        (cost, _, reqs, recent, held, _, url, overlap, indexed, inflight, new_prefill, pending, decode, _,
         penalty, reuse, place) = r  # fmt: skip
        terms = {
            "prompt_blocks": prompt_blocks,
            "indexed_blocks": float(indexed),
            "inflight_blocks": float(inflight),
            "new_prefill_blocks": new_prefill,
            "pending_prefill_blocks": pending,
            "decode_load": decode,
            "reuse_penalty": reuse,
            "placement_penalty": place,
            "held_blocks": held,
            "recent_placements": recent,
            "in_flight": float(reqs),
            "hot": 1.0 if penalty else 0.0,
            "holders_queue_blocks": rep[0] if math.isfinite(rep[0]) else 0.0,
            "copy_cost_blocks": rep[1],
            "replicate": 1.0 if rep[2] else 0.0,
        }
        if penalty:
            terms["guard_penalty"] = penalty
        return WorkerScore(url=url, cost=cost, cached_blocks=overlap, terms=terms)

    def _decided_by(self, pick: _Row, rows: Sequence[_Row]) -> str:
        """The term that put `pick` ahead of the best other worker: for the explain and the logs."""
        other = next((r for r in rows if r is not pick), None)
        if other is None:
            return "only candidate"
        c = self.config
        if other[_COST] != pick[_COST]:
            gaps = {
                "own prefill": other[10] - pick[10],
                "queued prefill": c.queue_weight * (other[11] - pick[11]),
                "decode load": c.decode_weight * (other[12] - pick[12]),
                "guard": other[_PENALTY] - pick[_PENALTY],
                "reuse": other[_REUSE] - pick[_REUSE],
                "placement": other[_PLACE] - pick[_PLACE],
            }
            term = max(gaps, key=lambda k: gaps[k])
            return f"{term} (vs {other[_URL]})"
        for idx, what in _TIE_KEYS:
            if other[idx] != pick[idx]:
                return f"tie on cost, then {what} (vs {other[_URL]})"
        return f"tie (vs {other[_URL]})"

    def explain(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[WorkerScore]:
        pb = request.prompt_tokens / request.block_size
        rows, rep = self._rows(request, candidates)
        return [self._score(r, pb, rep) for r in rows]

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        rows, rep = self._rows(request, candidates)
        pick = rows[0]
        n_hot = sum(1 for r in rows if r[_PENALTY])
        T = self.config.temperature
        cool = [r for r in rows if not r[_PENALTY]]
        if T > 0 and len(cool) > 1:
            lo = cool[0][_COST]
            pick = self._rng.choices(cool, weights=[math.exp(-(r[_COST] - lo) / T) for r in cool])[0]
            reason = f"softmax T={T:g}: cost {pick[_COST]:.1f} (cached {pick[_OVERLAP]} blocks)"
        else:
            reason = f"min cost {pick[_COST]:.1f} (cached {pick[_OVERLAP]} blocks)"
            reason += f", {n_hot} hot" if n_hot else ""
            reason += "; decided by " + self._decided_by(pick, rows)
        if rep[2]:
            reason += f"; hot prefix: holders' queue {rep[0]:.0f} > copy {rep[1]:.0f} blocks, no reuse credit"
        ordered = rows if pick is rows[0] else [pick, *(r for r in rows if r is not pick)]
        # The decision carries the scores of the first few ranked workers (what logs and retries
        # use); `explain` gives the whole table.
        pb = request.prompt_tokens / request.block_size
        return Decision(
            worker=pick[_URL],
            ranked=tuple(r[_URL] for r in ordered),
            policy=self.name,
            cached_blocks=pick[_OVERLAP],
            reason=reason,
            scores=tuple(self._score(r, pb, rep) for r in ordered[:DECISION_SCORES]),
        )


def make(params: Mapping[str, Any] | None, context: PolicyContext | None = None) -> KvAwarePolicy:
    config = config_from_params(KvAwareConfig, params, "kv_aware")
    if context is None or context.kv_index is None:
        raise ValueError("policy 'kv_aware' needs the router's KV index (make_policy(..., context=...))")
    return KvAwarePolicy(config, context.kv_index, context.inflight, context.block_counts, context.clock)
