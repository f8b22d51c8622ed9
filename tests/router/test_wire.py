"""`kvroute.router.wire`: routing fields read off request bodies, header filtering, the SSE side-parser."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from kvroute.router.errors import ApiError
from kvroute.router.wire import SseObserver, extract_fields, forward_headers, response_headers, usage_of


def test_sse_observer_first_token_gaps_and_split_events() -> None:
    burst = SseObserver()
    burst.feed(b'data: {"a": 1}\n\ndata: {"a": 2}\n\n', 1.0)
    assert burst.gaps == [(0.0, 1)]  # came together with the first event
    obs = SseObserver()
    assert obs.feed(b'data: {"a": 1}\n\nda', 1.0) is True  # first event; a second one starts
    assert (obs.events, obs.first_at, obs.ends_clean) == (1, 1.0, False)
    assert obs.feed(b'ta: {"a": 2}\n\n', 1.5) is False
    assert obs.gaps == [(0.5, 1)]
    obs.feed(b'data: {"a": 3}\n\ndata: {"a": 4}\n\ndata: {"a": 5}\n\n', 2.1)  # three at once: 0.6 s shared
    assert obs.gaps[1][1] == 3 and obs.gaps[1][0] == pytest.approx(0.2)
    obs.feed(b": keep-alive comment\n\n", 9.0)  # no data event: no gap, last_at unchanged
    obs.feed(b"data: [DONE]\n\n", 9.5)
    assert (obs.events, obs.done, obs.last_at, len(obs.gaps)) == (5, True, 2.1, 2)
    assert obs.last_data == b'{"a": 5}' and obs.first_data == b'{"a": 1}'


def test_sse_observer_one_event_per_chunk() -> None:
    """The streaming case (one token per chunk) takes a fast path that counts as the general one does."""
    obs = SseObserver()
    assert obs.feed(b'data: {"a": 1}\n\n', 1.0) is True
    assert obs.feed(b'data: {"a": 2}\n\n', 1.25) is False
    obs.feed(b'data: {"a": 3}\r\n\n', 1.5)  # CR before the LF: stripped like the general path does
    obs.feed(b"data:\n\n", 1.75)  # empty data: not an event
    obs.feed(b"data: [DONE]\n\n", 2.0)
    assert (obs.events, obs.last_data, obs.last_at) == (3, b'{"a": 3}', 1.5)
    assert (obs.done, obs.ends_clean) == (True, True)
    assert obs.gaps == [(0.25, 1), (0.25, 1)]


def test_extract_fields_routes_batches_by_their_first_item_and_rejects_bad_types() -> None:
    f = extract_fields("generate", {"text": ["first", "second"], "sampling_params": {"max_new_tokens": 3}})
    assert (f.text, f.max_tokens) == ("first", 3)
    assert extract_fields("completions", {"prompt": [[1, 2, 3]]}).input_ids == [1, 2, 3]
    chat = extract_fields(
        "chat", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
    )
    assert chat.max_tokens == 9 and chat.messages is not None
    for kind, body in [
        ("generate", {"text": ""}),
        ("generate", {"input_ids": [1, -2]}),
        ("generate", {"text": "x", "stream": "yes"}),
        ("chat", {"messages": []}),
        ("completions", {"prompt": 5}),
    ]:
        with pytest.raises(ApiError) as info:
            extract_fields(kind, body)
        assert info.value.status == 400


def test_headers_drop_hop_by_hop_and_those_named_in_connection() -> None:
    h = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Connection", "X-Private"),
                ("X-Private", "1"),
                ("Keep-Alive", "5"),
                ("X-Keep", "a"),
                ("X-Keep", "b"),
            ]
        )
    )
    out = forward_headers(h, "X-Request-Id", "rid")
    assert out.getall("X-Keep") == ["a", "b"] and out["X-Request-Id"] == "rid"
    assert "X-Private" not in out and "Keep-Alive" not in out and "Connection" not in out
    resp = response_headers(CIMultiDict([("Server", "uvicorn"), ("Date", "d"), ("X-Engine", "e")]))
    assert list(resp.items()) == [("X-Engine", "e")]


def test_usage_of_native_openai_and_batches() -> None:
    native = usage_of(
        {"meta_info": {"id": "r", "prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 2}}
    )
    assert (native.prompt_tokens, native.cached_tokens, native.output_tokens, native.rid) == (10, 4, 2, "r")
    oai = usage_of({"id": "c", "usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}}})
    assert (oai.prompt_tokens, oai.cached_tokens, oai.rid) == (5, 1, "c")
    batch = usage_of([{"meta_info": {"prompt_tokens": 1}}, {"meta_info": {"prompt_tokens": 2}}])
    assert batch.prompt_tokens == 3
