"""Block hashing: chaining means equal hash <=> equal whole prefix; tokenizers feed it."""

import json

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvroute.cache_index.hashing import (
    ByteTokenizer,
    HFTokenizer,
    hash_blocks,
    hash_text_blocks,
    namespace_seed,
    render_plain_chat,
)


def test_hash_matches_the_documented_chain() -> None:
    # h_i = xxh3_64(h_{i-1} as 8 bytes LE || tokens as u32 LE), seeded; root parent is 0.
    tokens = list(range(8))
    h1 = xxhash.xxh3_64_intdigest(
        (0).to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in tokens[:4]), seed=7
    )
    h2 = xxhash.xxh3_64_intdigest(
        h1.to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in tokens[4:]), seed=7
    )
    assert hash_blocks(tokens, 4, seed=7) == [h1, h2]


@pytest.mark.parametrize(
    ("n_tokens", "block_size", "expected_blocks"),
    [
        (0, 16, 0),  # empty prompt: nothing to route on
        (15, 16, 0),  # a partial block is never hashed
        (16, 16, 1),
        (33, 16, 2),  # trailing partial block dropped
    ],
)
def test_only_full_blocks_are_hashed(n_tokens: int, block_size: int, expected_blocks: int) -> None:
    assert len(hash_blocks(list(range(n_tokens)), block_size)) == expected_blocks


@given(
    st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=80),
    st.lists(st.integers(0, 2**32 - 1), max_size=80),
)
def test_equal_hash_means_equal_prefix(a: list[int], b: list[int]) -> None:
    ha, hb = hash_blocks(a, 8), hash_blocks(b, 8)
    for i, (x, y) in enumerate(zip(ha, hb, strict=False)):
        assert (x == y) == (a[: (i + 1) * 8] == b[: (i + 1) * 8])


def test_parent_continues_a_chain() -> None:
    tokens = list(range(64))
    whole = hash_blocks(tokens, 16)
    assert hash_blocks(tokens[32:], 16, parent=whole[1]) == whole[2:]


def test_namespace_separates_models_and_loras() -> None:
    tokens = list(range(32))
    base = hash_blocks(tokens, 16, seed=namespace_seed("llama"))
    assert hash_blocks(tokens, 16, seed=namespace_seed("qwen")) != base
    assert hash_blocks(tokens, 16, seed=namespace_seed("llama", "adapter-a")) != base
    assert hash_blocks(tokens, 16, seed=namespace_seed("llama")) == base


@pytest.mark.parametrize("bad", [[-1], [2**32]])
def test_out_of_range_token_ids_are_a_value_error(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        hash_blocks(bad * 16, 16)


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        hash_blocks([1, 2], 0)


def test_text_fallback_chains_utf8_chunks() -> None:
    a = hash_text_blocks("système " * 20, 16)
    b = hash_text_blocks("système " * 20 + "different tail", 16)
    assert len(a) == len("système ".encode() * 20) // 16
    assert b[: len(a)] == a  # same prefix, same chunks
    assert hash_text_blocks("x" * 15, 16) == []


def test_byte_tokenizer_is_deterministic_and_templated() -> None:
    tok = ByteTokenizer()
    assert tok.encode("hé") == [104, 195, 169]
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert tok.apply_chat_template(msgs) == tok.encode(render_plain_chat(msgs))
    assert "<|assistant|>" in render_plain_chat(msgs)
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": 5}])


def _write_hf_tokenizer(tmp_path, template: str | None):  # type: ignore[no-untyped-def]
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<s>": 3, "user": 4, "assistant": 5, ":": 6}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    if template is not None:
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": template, "bos_token": "world"})
        )
    return tmp_path


def test_hf_tokenizer_reads_local_files_and_applies_chat_template(tmp_path) -> None:  # type: ignore[no-untyped-def]
    template = "{{ bos_token }}{% for m in messages %} {{ m.role }} : {{ m.content }}{% endfor %}"
    template += "{% if add_generation_prompt %} assistant :{% endif %}"
    tok = HFTokenizer(_write_hf_tokenizer(tmp_path, template))
    assert tok.encode("hello world") == [1, 2]
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == [
        2,
        4,
        6,
        1,
        5,
        6,
    ]  # bos, user, :, hello, assistant, :


def test_hf_tokenizer_missing_file_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path)
