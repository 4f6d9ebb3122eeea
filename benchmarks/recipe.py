"""Which training recipe learns most from the same tokens in the same time? The tiny shape (depth 4,
width 128, sequence 256), 200 steps of 8,192 tokens on the offline corpus, once per named variant,
side by side in one run. Each variant is the `nanochat pretrain --preset tiny` command with a few
flags added, run in its own process, so its wall-clock is the command's, compile and evaluation
included; every variant measures validation bpb at steps 50, 100, 150 and 200 on the same 65,536
held-out tokens.

    uv run python benchmarks/recipe.py                       # every variant, seed 42
    uv run python benchmarks/recipe.py --variants default,relu2 --seeds 42,43
    uv run python benchmarks/recipe.py --compile ...         # every variant compiled (faster)

Prints one markdown table: variant, parameters, val bpb at 50/100/150/200 (with several seeds: the
mean, and the spread min–max at 200), wall-clock, median tok/s, and bpb at 200 against `default`.
Do not run anything else on the machine meanwhile: wall-clock and tok/s are compared across rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from nanochat.checkpoint import read_meta
from nanochat.config import TOKENIZER_PRESETS, run_dir, tokenizer_dir
from nanochat.data.offline import build_offline_corpus
from nanochat.data.sources import resolve_source
from nanochat.metrics import read_metrics
from nanochat.runs import build_model, latest
from nanochat.tokenizer import Tokenizer

# name -> extra `nanochat pretrain` flags, each against today's default (which the ablation in
# benchmarks/README.md produced: bigram table ×16, smear, value embeddings, soft-cap 30, Muon rate
# 0.04 with momentum 0.85 on tiny; bf16 autocast on a CPU with bf16 matmuls). Eager unless a variant
# asks for --compile or the run passes --compile, so that the rows compare like with like.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    # The recipe the ablation began from, before issue 17 (fp32 then, as the CPU default was).
    "before-issue-17": ["--dtype", "float32", "--no-value-embeddings", "--no-smear", "--bigram-multiple", "0",
                        "--logit-softcap", "15", "--optim.matrix-lr", "0.02", "--optim.muon-momentum", "0.95"],
    "compile": ["--compile"],
    "fp32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    # Each adopted part taken out again.
    "no-bigram": ["--bigram-multiple", "0"],
    "bigram-x4": ["--bigram-multiple", "4"],
    "no-smear": ["--no-smear"],
    "no-value-embeddings": ["--no-value-embeddings"],
    "softcap-15": ["--logit-softcap", "15"],
    "momentum-0.95": ["--optim.muon-momentum", "0.95"],
    "matrix-lr-0.02": ["--optim.matrix-lr", "0.02"],
    # Measured and rejected (benchmarks/README.md), kept to be re-measured on today's default.
    "matrix-lr-0.06": ["--optim.matrix-lr", "0.06"],
    "relu2": ["--mlp", "relu2"],
    "rope-100k": ["--rope-theta", "100000"],
    "warmdown-0.5": ["--optim.warmdown-frac", "0.5"],
    "adam-lr-x2": ["--optim.embedding-lr", "0.4", "--optim.unembedding-lr", "0.008"],
    "embedding-lr-x0.5": ["--optim.embedding-lr", "0.1"],
    "unembedding-lr-x2": ["--optim.unembedding-lr", "0.008"],
    "x0-skip": ["--x0-skip"],
    "ve-every-layer": ["--value-embed-every", "1"],
    "ve-gate": ["--ve-gate"],
    "attn-scale-2x": ["--attn-scale", "0.35"],
    "normuon": ["--optim.normuon"],
    "cautious-wd-0.1": ["--optim.weight-decay", "0.1", "--optim.cautious-weight-decay"],
    "momentum-cooldown": ["--optim.muon-momentum", "0.95", "--optim.muon-momentum-warmup", "50",
                          "--optim.muon-momentum-cooldown"],
}
CHECKPOINTS = (50, 100, 150, 200)


def prepare_home() -> None:
    """The offline corpus and the tiny preset's tokenizer, in a fresh NANOCHAT_HOME."""
    os.environ["NANOCHAT_HOME"] = tempfile.mkdtemp(prefix="nanochat-recipe-bench-")
    build_offline_corpus()
    tok_cfg = TOKENIZER_PRESETS["tiny"]
    Tokenizer.train(resolve_source("offline").documents("train"), tok_cfg.vocab_size).save(tokenizer_dir("tiny"))


def run_variant(name: str, flags: list[str], seed: int, steps: int, compile_all: bool = False) -> dict:
    run = f"{name}-s{seed}"
    command = [sys.executable, "-m", "nanochat.cli", "pretrain", "--preset", "tiny", "--run", run, "--seed",
               str(seed), "--max-steps", str(steps), "--save-every", "0", *flags]
    if compile_all:
        command.append("--compile")
    elif "--compile" not in flags:
        command.append("--no-compile")
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{name} (seed {seed}) failed:\n{proc.stderr[-3000:]}")
    records = list(read_metrics(run_dir(run) / "metrics.jsonl"))
    bpb = {r["step"]: r["val_bpb"] for r in records if "val_bpb" in r}
    tok_s = statistics.median(r["tok_per_s"] for r in records if r.get("tok_per_s"))
    params = build_model(read_meta(latest(run, "base"), verify=False)).num_params()
    return {"bpb": bpb, "seconds": seconds, "tok_s": tok_s, "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--seeds", default="42", help="comma-separated seeds; each variant runs once per seed")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--compile", action="store_true",
                    help="compile every variant (faster; compiled and eager runs reach the same bpb on CPU)")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    prepare_home()
    results: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: a slow hour of the shared machine hits every variant alike
        for name in names:
            results.setdefault(name, []).append(run_variant(name, VARIANTS[name], seed, args.steps, args.compile))
            r = results[name][-1]
            print(f"{name} seed {seed}: bpb {r['bpb'].get(args.steps, float('nan')):.4f}, {r['seconds']:.0f} s",
                  file=sys.stderr, flush=True)

    def mean_bpb(name: str, step: int) -> float | None:
        values = [r["bpb"][step] for r in results[name] if step in r["bpb"]]
        return statistics.mean(values) if values else None

    steps = [s for s in CHECKPOINTS if s <= args.steps]
    reference = mean_bpb(names[0], args.steps)
    print(f"\ntiny shape, {args.steps} steps × 8,192 tokens, offline corpus, seeds {args.seeds}"
          f"{', every variant compiled' if args.compile else ''}; "
          f"bpb ratio against `{names[0]}`\n")
    print("| variant | flags | parameters | " + " | ".join(f"bpb @{s}" for s in steps)
          + " | spread @" + str(args.steps) + " | wall-clock | tok/s | vs " + names[0] + " |")
    print("|---|---|---:|" + "---:|" * (len(steps) + 4))
    for name in names:
        rs = results[name]
        final = [r["bpb"][args.steps] for r in rs]
        spread = f"{min(final):.4f}–{max(final):.4f}" if len(final) > 1 else "—"
        cells = " | ".join(f"{mean_bpb(name, s):.4f}" for s in steps)
        print(f"| {name} | `{' '.join(VARIANTS[name]) or '—'}` | {rs[0]['params']:,} | {cells} | {spread} | "
              f"{statistics.mean(r['seconds'] for r in rs):.0f} s | {statistics.mean(r['tok_s'] for r in rs):,.0f} | "
              f"{mean_bpb(name, args.steps) / reference:.3f}× |")


if __name__ == "__main__":
    main()
