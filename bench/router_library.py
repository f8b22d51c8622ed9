"""Router library overhead per request (tokenize+hash, select, on_routed, on_finished)."""
import random, time, statistics, itertools, sys
sys.path.insert(0, "/work/main")
from router import Router
from router.types import Worker, WorkerState
from cache_index.events import BlockStored, KvEventBatch

BS = 16
rng = random.Random(0)
N_WORKERS = int(sys.argv[1]) if len(sys.argv) > 1 else 64
import os
PROMPT_TOK = int(os.environ.get("PT", "8192"))
eid = itertools.count(1)

def pct(xs, p): xs = sorted(xs); return xs[int(p * (len(xs) - 1))]

for policy in ("kv_aware", "cache_aware", "round_robin"):
    r = Router(block_size=BS, policy=policy)
    for i in range(N_WORKERS):
        r.add_worker(Worker(f"http://w{i}", state=WorkerState.HEALTHY))
    # 32 shared system prefixes of 4k tokens, each held by 4 workers, plus per-worker tails
    prefixes = [[rng.randrange(50000) for _ in range(4096)] for _ in range(32)]
    for p_i, pre in enumerate(prefixes):
        for k in range(4):
            w = f"http://w{(p_i * 4 + k) % N_WORKERS}"
            toks = pre + [rng.randrange(50000) for _ in range(4096)]
            evs, parent = [], None
            for off in range(0, len(toks), BS):
                h = next(eid); evs.append(BlockStored((h,), parent, tuple(toks[off:off+BS]), BS)); parent = h
            r.apply_kv_events(w, KvEventBatch(0.0, tuple(evs)))
    prompts = [(prefixes[rng.randrange(32)] + [rng.randrange(50000) for _ in range(max(0, PROMPT_TOK - 4096))])[:PROMPT_TOK] for _ in range(200)]
    # 256 requests in flight
    open_t = []
    for i in range(256):
        req = r.routing_request(input_ids=prompts[i % 200])
        open_t.append(r.on_routed(r.select(req), req))
    t_tok, t_sel, t_life = [], [], []
    for i in range(2000):
        ids = prompts[i % 200]
        a = time.perf_counter(); req = r.routing_request(input_ids=ids)
        b = time.perf_counter(); d = r.select(req)
        c = time.perf_counter(); t = r.on_routed(d, req); r.on_first_token(t); r.on_finished(t, cached_tokens=0)
        e = time.perf_counter()
        t_tok.append(b - a); t_sel.append(c - b); t_life.append(e - c)
    f = lambda xs: f"p50 {pct(xs,.5)*1e6:7.1f} us  p99 {pct(xs,.99)*1e6:7.1f} us"
    print(f"{policy:12s} workers={N_WORKERS} prompt={PROMPT_TOK} tok, index={len(r.index)} blocks, 256 in flight")
    print(f"  tokenize+hash(input_ids) {f(t_tok)}")
    print(f"  select                   {f(t_sel)}")
    print(f"  on_routed+first+finished {f(t_life)}")
