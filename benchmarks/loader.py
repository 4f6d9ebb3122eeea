"""Does the data loader outrun the model? Loader tokens/s against the training step's consumption.

Measured side by side in one run, on the offline corpus:
  * loader throughput: tokenize + pack + batch as fast as possible, with all cores and with one
    encoder thread (the per-core figure);
  * the tiny preset's training step (forward, backward, optimizer) on this machine's CPU: the
    rate at which training consumes tokens;
  * the time a real training loop spends waiting on the loader (steady state should be ~0).
From the per-core figure it states how many CPU cores keep one H100 training d20 fed (≈140k
tokens/s per GPU, nanochat's published d20 speed).

    uv run python benchmarks/loader.py [--batches 1000] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nanochat.config import PRESETS, TOKENIZER_PRESETS
from nanochat.data.loader import DataLoader
from nanochat.data.sources import resolve_source
from nanochat.gpt import GPT
from nanochat.optim import build_optimizer
from nanochat.runtime import init_runtime
from nanochat.tokenizer import Tokenizer
from nanochat.train.loop import grad_accum_steps, train_step

H100_D20_TOKENS_PER_S = 140_000


def loader_rate(source, tok, batch, seq, n_batches, threads):
    dl = DataLoader(source, tok, batch, seq, "train", num_threads=threads, prefetch=8)
    next(dl)  # start-up (first unit read) is not steady state
    start = time.perf_counter()
    for _ in range(n_batches):
        next(dl)
    rate = n_batches * batch * seq / (time.perf_counter() - start)
    dl.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    cfg = PRESETS["tiny"]
    B, T = cfg.micro_batch, cfg.model.sequence_len
    source = resolve_source("offline")
    vocab = TOKENIZER_PRESETS["tiny"].vocab_size
    tok = Tokenizer.train(source.documents("train"), vocab)  # the tiny preset's tokenizer, ~1 s
    proxies = {f"tiny ({vocab:,}, ours)": tok, "cl100k_base (100,277)": Tokenizer.official("cl100k_base")}

    rows = []
    for name, t in proxies.items():
        rows.append((name, loader_rate(source, t, B, T, args.batches, None),
                     loader_rate(source, t, B, T, args.batches, 1)))

    rt = init_runtime(device="cpu", seed=0)
    model = GPT(cfg.model, tok.vocab_size)
    opt = build_optimizer(model, cfg.optim, cfg.total_batch_tokens)
    accum = grad_accum_steps(cfg.total_batch_tokens, B, T, 1)
    dl = DataLoader(source, tok, B, T, "train")
    train_step(model, opt, dl, accum, rt)  # warm-up
    dl.wait_seconds = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, opt, dl, accum, rt)
    elapsed = time.perf_counter() - start
    consumed = args.steps * cfg.total_batch_tokens / elapsed
    waited = dl.wait_seconds / elapsed
    dl.close()

    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; tiny preset B={B} T={T}\n")
    print("| tokenizer | loader tok/s (all cores) | loader tok/s (1 encoder thread) | × tiny training step |")
    print("|---|---:|---:|---:|")
    for name, all_cores, one in rows:
        print(f"| {name} | {all_cores:,.0f} | {one:,.0f} | {all_cores / consumed:.1f}× |")
    print(f"\ntiny training step consumes {consumed:,.0f} tok/s on this CPU; the loop waited on the loader "
          f"{waited:.2%} of the time")
    per_core = min(one for _, _, one in rows)
    print(f"cores to feed one H100 at d20 ({H100_D20_TOKENS_PER_S:,} tok/s): "
          f"{H100_D20_TOKENS_PER_S / per_core:.2f} (from the slowest per-core figure, {per_core:,.0f} tok/s)")
    # Under torchrun every rank tokenizes the whole global stream and keeps its rows.
    print(f"on 8×H100 each rank tokenizes all 8 GPUs' tokens: {8 * H100_D20_TOKENS_PER_S / per_core:.2f} "
          "cores per rank")


if __name__ == "__main__":
    main()
