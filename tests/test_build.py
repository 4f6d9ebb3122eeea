"""The Rust extension is built as an abi3 module and its pre-tokenizer is callable from Python."""

from pathlib import Path

import nanochat._bpe as bpe


def test_extension_is_abi3():
    # One wheel for every CPython >= 3.10: the stable-ABI suffix, not a version-specific one.
    assert Path(bpe.__file__).name.startswith("_bpe.abi3.")


def test_pretokenizer_from_python():
    assert bpe.pretokenize("Hello world's", "cl100k") == ["Hello", " world", "'s"]
    text = "naïve  café\n\n 123456 🙂"
    assert "".join(bpe.pretokenize(text, "cl100k")) == text
