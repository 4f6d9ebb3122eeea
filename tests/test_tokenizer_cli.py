"""`nanochat tokenizer train` and `eval` on small local files, under a temporary NANOCHAT_HOME."""

from __future__ import annotations

import json

import pytest

from nanochat.tokenizer import Tokenizer, TokenizerError
from nanochat.train.tokenizer import cli


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    txt = tmp_path / "a.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 200 + "12345 67890\n" * 50)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i}: hello world's {i * 7}"}) + "\n" for i in range(300)))
    return tmp_path, txt, jsonl


def test_train_writes_a_loadable_tokenizer_and_eval_prints_a_table(corpus, capsys):
    tmp_path, txt, jsonl = corpus
    assert cli(["train", "--name", "small", "--vocab-size", "400", "--inputs", str(txt), str(jsonl)]) == 0
    out = capsys.readouterr().out
    assert "trained 'small': 400 tokens (9 special)" in out
    tok = Tokenizer.load(tmp_path / "home" / "tokenizers" / "small")
    assert tok.vocab_size == 400 and tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    out_json = tmp_path / "run" / "tokenizer.json"
    assert cli(["eval", "--name", "small", "--inputs", str(jsonl), "--out", str(out_json)]) == 0
    table = capsys.readouterr().out
    for name in ("small", "cl100k_base", "o200k_base"):
        assert f"| {name} |" in table
    assert "bytes/token" in table
    stats = json.loads(out_json.read_text())  # the same table, for the report card
    n_bytes = sum(len(json.loads(line)["text"].encode()) for line in jsonl.read_text().splitlines())
    assert stats["bytes"] == n_bytes and stats["documents"] == 300 and stats["special_tokens"] == 9
    assert [t["name"] for t in stats["tokenizers"]] == ["small", "cl100k_base", "o200k_base"]
    for t in stats["tokenizers"]:
        assert t["bytes_per_token"] == pytest.approx(n_bytes / t["tokens"])
        assert f"| {t['name']} | {t['vocab_size']:,} | {t['tokens']:,} | {t['bytes_per_token']:.3f} |" in table


def test_caps_limit_the_characters_read(corpus, capsys):
    _, txt, _ = corpus
    assert cli(["train", "--name", "capped", "--vocab-size", "280", "--inputs", str(txt), "--max-chars", "1000"]) == 0
    assert "from 1,000 characters" in capsys.readouterr().out


def test_eval_without_a_trained_tokenizer_names_the_fix(corpus):
    with pytest.raises(TokenizerError, match="nanochat tokenizer train"):
        cli(["eval", "--name", "missing"])


def test_unknown_action_is_a_usage_error(capsys):
    assert cli(["frobnicate"]) == 2
    assert "usage: nanochat tokenizer" in capsys.readouterr().err
    assert cli([]) == 2
