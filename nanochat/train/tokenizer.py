"""`nanochat tokenizer train|eval`: train a BPE tokenizer on a data source, and measure it.

  train  Tokenizer.train on the documents of files (.txt/.jsonl/.parquet) or data sources
         (default: the offline corpus), saved to NANOCHAT_HOME/tokenizers/<name>.
  eval   bytes per token on held-out text, next to OpenAI's cl100k_base and o200k_base, as a
         table (and, with --out, as JSON for the report card).

This is the tokenizer's command line, kept out of nanochat.tokenizer because it reads data
sources, a higher layer than the tokenizer that everything (inference included) imports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nanochat.config import TOKENIZER_PRESETS, TokenizerEvalConfig, TokenizerTrainConfig, parse_config, tokenizer_dir
from nanochat.data.sources import DataSource, resolve_source
from nanochat.metrics import progress
from nanochat.tokenizer import Tokenizer, TokenizerError

USAGE = "usage: nanochat tokenizer {train,eval} [options]   (nanochat tokenizer train --help for options)"


def _documents(inputs: tuple[str, ...], split: str):
    """Documents of each input: a .txt/.jsonl/.parquet file (all of it), or a data source
    ("offline", "fineweb" or a folder; its `split`). No inputs: the offline corpus."""
    for spec in inputs or ("offline",):
        path = Path(spec).expanduser()
        if path.is_file():
            yield from DataSource(path.stem, (path,), (path,)).documents("train")
        else:
            yield from resolve_source(spec).documents(split)


def _train(argv: list[str]) -> int:
    cfg = parse_config(TokenizerTrainConfig, argv, presets=TOKENIZER_PRESETS, prog="nanochat tokenizer train",
                       description="Train a byte-level BPE tokenizer (written to NANOCHAT_HOME/tokenizers/<name>).")
    start = time.perf_counter()
    reading = progress(desc="reading", unit="char", unit_scale=True)
    chars = 0

    def counted(docs):
        nonlocal chars
        for doc in docs:
            n = min(len(doc), cfg.doc_cap or len(doc), cfg.max_chars - chars)
            chars += n
            reading.update(n)
            yield doc

    merging = None

    def merged(done: int, total: int) -> None:
        nonlocal merging
        if merging is None:  # counting is over once the first merges are made
            reading.close()
            merging = progress(total=total, desc="merging", unit="merge")
        merging.update(done - merging.n)

    tok = Tokenizer.train(counted(_documents(cfg.inputs, "train")), cfg.vocab_size, name=cfg.name,
                          doc_cap=cfg.doc_cap, max_chars=cfg.max_chars, progress=merged)
    reading.close()
    if merging is not None:
        merging.close()
    out = tok.save(tokenizer_dir(cfg.name))
    print(f"trained {cfg.name!r}: {tok.vocab_size} tokens ({len(tok.special_tokens)} special) from "
          f"{chars:,} characters in {time.perf_counter() - start:.1f}s -> {out}")
    return 0


def _eval(argv: list[str]) -> int:
    cfg = parse_config(TokenizerEvalConfig, argv, prog="nanochat tokenizer eval",
                       description="Bytes per token on held-out text, against cl100k_base and o200k_base.")
    ours = Tokenizer.load(tokenizer_dir(cfg.name))
    docs = list(_documents(cfg.inputs, "val"))
    if not docs:
        raise TokenizerError("no held-out text to evaluate on; pass --inputs FILE_OR_FOLDER")
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    rows = []
    for tok in (ours, Tokenizer.official("cl100k_base"), Tokenizer.official("o200k_base")):
        ids, _ = tok.encode_batch_numpy(docs, disallowed_special=())
        rows.append((tok.name, tok.vocab_size, len(ids), n_bytes / max(len(ids), 1)))
    print(f"{len(docs):,} held-out documents, {n_bytes:,} bytes\n")
    print(f"| tokenizer | vocab | tokens | bytes/token | tokens vs {ours.name} |\n|---|---:|---:|---:|---:|")
    for name, vocab, n_tokens, bpt in rows:
        print(f"| {name} | {vocab:,} | {n_tokens:,} | {bpt:.3f} | {n_tokens / rows[0][2]:.2f}x |")
    if cfg.out:
        table = [{"name": n, "vocab_size": v, "tokens": t, "bytes_per_token": b} for n, v, t, b in rows]
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"documents": len(docs), "bytes": n_bytes, "special_tokens": len(ours.special_tokens),
                                   "tokenizers": table}, indent=2))
    return 0


def cli(argv: list[str]) -> int:
    """`nanochat tokenizer train|eval`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    actions = {"train": _train, "eval": _eval}
    if argv[0] not in actions:
        print(f"nanochat tokenizer: unknown action {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    return actions[argv[0]](argv[1:])
