"""The simulated engine's SGLang HTTP API over real loopback sockets (native, OpenAI, state endpoints)."""

from __future__ import annotations

import logging

import aiohttp
import openai
import orjson
import pytest

from kvroute.cache_index.hashing import ByteTokenizer
from kvroute.engines.sim.fleet import SimFleet
from tests.engines.conftest import generate, wait_for

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 bytes = 360 tokens


async def test_repeated_prompt_reports_cached_tokens(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    s1, r1 = await generate(session, url, PROMPT, max_new_tokens=5)
    s2, r2 = await generate(session, url, PROMPT, max_new_tokens=5)
    assert (s1, s2) == (200, 200)
    m1, m2 = r1["meta_info"], r2["meta_info"]
    assert m1["prompt_tokens"] == m2["prompt_tokens"] == len(PROMPT)
    assert m1["cached_tokens"] == 0
    # Whole pages of the prompt minus its last token (always recomputed), as SGLang does.
    assert m2["cached_tokens"] == (len(PROMPT) - 1) // 16 * 16
    assert m1["completion_tokens"] == len(r1["output_ids"]) == 5
    assert m1["finish_reason"] == {"type": "length", "length": 5}
    assert r1["text"] == bytes(r1["output_ids"]).decode()
    # input_ids and text agree (the engine tokenizes with the byte tokenizer)
    s3, r3 = await generate(session, url, None, 1, input_ids=ByteTokenizer().encode(PROMPT))
    assert s3 == 200 and r3["meta_info"]["cached_tokens"] == m2["cached_tokens"]


async def test_generate_stream_is_sse_with_cumulative_output_and_done(
    fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    body = {"text": "hello", "stream": True, "sampling_params": {"max_new_tokens": 6}, "rid": "r-1"}
    async with session.post(fleet.urls[0] + "/generate", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = [orjson.loads(e[len(b"data: ") :]) for e in events[:-2]]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert [c["meta_info"]["id"] for c in chunks] == ["r-1"] * len(chunks)
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert len(last["output_ids"]) == last["meta_info"]["completion_tokens"] == 6
    # cumulative (SGLang's default stream form): each chunk's ids extend the previous ones
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]


async def test_seeded_output_is_deterministic(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    sp = {"max_new_tokens": 8, "sampling_seed": 7}
    outs = []
    for _ in range(2):
        async with session.post(fleet.urls[0] + "/generate", json={"text": "x", "sampling_params": sp}) as r:
            outs.append((await r.json())["output_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 8


async def test_openai_client_streams_chat_and_completions(fleet: SimFleet) -> None:
    client = openai.AsyncOpenAI(base_url=fleet.urls[0] + "/v1", api_key="none", max_retries=0)
    try:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
        for attempt in range(2):
            stream = await client.chat.completions.create(
                model="sim/llama3-8b", messages=msgs, max_tokens=7, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            text, finish, usage = "", None, None
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
                if ch.usage is not None:
                    usage = ch.usage
            assert len(text) == 7 and finish == "length"
            assert usage is not None and usage.completion_tokens == 7
            n_prompt = len(ByteTokenizer().apply_chat_template(msgs))
            assert usage.prompt_tokens == n_prompt
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            assert cached == (0 if attempt == 0 else (n_prompt - 1) // 16 * 16)

        comp = await client.completions.create(model="sim/llama3-8b", prompt="abc", max_tokens=5, stream=True)
        parts = [c async for c in comp]
        assert (
            "".join(c.choices[0].text for c in parts if c.choices)
            and parts[-1].choices[0].finish_reason == "length"
        )
        full = await client.completions.create(model="sim/llama3-8b", prompt="abc", max_tokens=3)
        assert len(full.choices[0].text) == 3 and full.usage is not None and full.usage.prompt_tokens == 3
        chat = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "q"}], max_tokens=2
        )
        assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].message.content or "") == 2
        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim/llama3-8b"]
    finally:
        await client.close()


async def test_bad_input_is_a_400_json_error(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    cases = [
        ("/generate", b"{not json", "error"),  # malformed JSON
        ("/generate", orjson.dumps({"sampling_params": {}}), "error"),  # neither text nor input_ids
        ("/generate", orjson.dumps({"input_ids": [1, -2]}), "error"),  # negative token id
        ("/generate", orjson.dumps({"text": "x" * 9000}), "error"),  # past the tiny profile's context
        ("/v1/chat/completions", orjson.dumps({"messages": []}), "message"),  # OpenAI error object
        ("/v1/completions", orjson.dumps({"prompt": 5}), "message"),
    ]
    for path, body, key in cases:
        async with session.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400, (path, body)
            err = await r.json()
            assert key in err, err
            if key == "message":
                assert err["object"] == "error" and err["code"] == 400


async def test_state_endpoints(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await generate(session, url, PROMPT, 2)
    await generate(session, url, PROMPT, 2)
    for path in ("/server_info", "/get_server_info"):
        async with session.get(url + path) as r:
            info = await r.json()
        assert info["page_size"] == 16 and info["disaggregation_mode"] == "null"
        assert info["max_total_num_tokens"] == 8192 and info["disaggregation_bootstrap_port"] is None
        src = info["kv_event_sources"][0]
        assert src["endpoint"] == fleet.event_endpoints[0] and src["block_size"] == 16
        assert info["kv_events"]["replay_endpoint"].startswith("tcp://127.0.0.1:")
    async with session.get(url + "/model_info") as r:
        assert (await r.json())["is_generation"] is True
    async with session.get(url + "/get_load") as r:
        (load,) = await r.json()
        assert load["num_reqs"] == 0 and load["dp_rank"] == 0
    async with session.get(url + "/v1/loads") as r:
        loads = await r.json()
        assert loads["loads"][0]["cache_hit_rate"] > 0.4
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
    ):
        assert f"\n{name}{{" in text
    async with session.get(url + "/health") as r:
        assert r.status == 200
    async with session.get(url + "/health_generate") as r:
        assert r.status == 200
    async with session.get(url + "/flush_cache") as r:
        assert r.status == 200
    _, again = await generate(session, url, PROMPT, 1)
    assert again["meta_info"]["cached_tokens"] == 0  # the flush emptied the cache


async def test_abort_and_client_disconnect_free_the_engine(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # real time: ~1 ms per decode step, so 4000 tokens take seconds
    async with SimFleet(1, time_scale=1.0) as f:
        url, eng = f.urls[0], f.engines[0]
        body = {"text": "long", "stream": True, "sampling_params": {"max_new_tokens": 4000}, "rid": "gone"}
        async with session.post(url + "/generate", json=body) as r:
            await r.content.readline()  # first token arrived
            assert eng.load().num_running_reqs == 1
        # leaving the block closes the connection: the engine aborts the request
        await wait_for(lambda: eng.load().num_running_reqs == 0, what="abort on disconnect")
        assert eng.records_by_rid["gone"].finish_reason is not None
        assert eng.records_by_rid["gone"].finish_reason["type"] == "abort"
        assert eng.cache.private_tokens == 0 and eng.cache.protected_tokens == 0
        assert not [
            r for r in caplog.records if r.levelno >= logging.ERROR
        ]  # a disconnect is no server error

        body["rid"] = "killed"
        async with session.post(url + "/generate", json=body) as r:
            await r.content.readline()
            async with session.post(url + "/abort_request", json={"rid": "killed"}) as a:
                assert a.status == 200
            rest = await r.read()
        assert rest.endswith(b"data: [DONE]\n\n") and b'"type":"abort"' in rest
