"""The hand-written pre-tokenizers cut exactly where the regex engine does, and where tiktoken
does, for every Unicode scalar value (the Rust tests check the class tables code point by code
point against the regex engine; these check the whole pipeline from Python)."""

from __future__ import annotations

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat import _bpe
from nanochat.tokenizer import Tokenizer

PATTERNS = ["cl100k", "o200k", "nanochat"]
ALPHABET = list("aZǅʰ中\u0301\u0903é1²Ⅻ٣ \t\n\r\u00a0\u3000\u2028\x85'!/.😀-sStTlLvVeErRdDmMſK")


def test_named_patterns_and_their_regex_text_resolve_to_each_other():
    assert _bpe.PATTERN_NAMES == ["cl100k", "o200k", "nanochat"]
    assert _bpe.pattern_regex("gpt4") == _bpe.pattern_regex("cl100k")
    assert _bpe.pattern_regex(r"\w+") == r"\w+"
    from tiktoken_ext.openai_public import cl100k_base, o200k_base

    # The published patterns, character for character (these construct from local names only).
    for name, fn in [("cl100k", cl100k_base), ("o200k", o200k_base)]:
        import inspect
        import re

        source = inspect.getsource(fn)
        assert all(part in _bpe.pattern_regex(name) for part in re.findall(r'r"""(.*?)"""', source))


def test_examples():
    assert _bpe.pretokenize("Hello world's", "cl100k") == ["Hello", " world", "'s"]
    assert _bpe.pretokenize("I'LL 12345", "o200k") == ["I'LL", " ", "123", "45"]
    assert _bpe.pretokenize("12345", "nanochat") == ["12", "34", "5"]
    assert _bpe.pretokenize("a  \n\n  b", "cl100k") == ["a", "  \n\n", " ", " b"]
    assert _bpe.pretokenize("x   ", "o200k") == ["x", "   "]
    assert _bpe.pretokenize("ab12", r"\d+") == ["12"]  # a user regex may skip text, as in tiktoken


def test_bad_patterns_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="invalid split pattern"):
        _bpe.pretokenize("x", "(unclosed")
    with pytest.raises(ValueError, match="engine"):
        _bpe.pretokenize("x", "cl100k", engine="fast")


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(alphabet=ALPHABET, max_size=40), st.text(max_size=40)))
def test_scanner_equals_regex_engine(pattern, text):
    pieces = _bpe.pretokenize(text, pattern)
    assert pieces == _bpe.pretokenize(text, pattern, engine="regex")
    assert "".join(pieces) == text


CONTEXTS = "aA1 !'"


def revealing_encodings(pattern: str) -> tuple[Tokenizer, tiktoken.Encoding]:
    """Ranks under which piece boundaries show in the ids: besides the 256 bytes, every context
    character merges with any byte before or after it, which it can only do inside one piece."""
    ranks = {bytes([b]): b for b in range(256)}
    for ctx in CONTEXTS.encode():
        for b in range(256):
            for token in (bytes([ctx, b]), bytes([b, ctx])):
                ranks.setdefault(token, len(ranks))
    ours = Tokenizer(ranks, pattern)
    return ours, ours.to_tiktoken()


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["cl100k", "o200k"])
def test_every_scalar_value_splits_as_in_tiktoken(pattern):
    ours, theirs = revealing_encodings(pattern)
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    for start in range(0, len(chars), 1 << 15):
        text = "".join(c + ctx for c in chars[start:start + (1 << 15)] for ctx in CONTEXTS)
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), f"near U+{ord(chars[start]):04X}"
