"""Which optimizer setting learns most from the same tokens? The tiny preset, trained in full
with each setting on the offline corpus, compared side by side in one run:

  * muon            Muon for block matrices, AdamW for embedding, head, vectors (the default)
  * muon+embedding  the seed plan's variant: the token embedding on Muon too
  * adamw           AdamW everywhere (the fallback, --optim.optimizer adamw)

Prints final training loss (mean of the last 20 steps) and validation bits per byte.

    uv run python benchmarks/optim.py [--steps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import tempfile

from nanochat.config import PRESETS, TOKENIZER_PRESETS, run_dir, tokenizer_dir
from nanochat.data.sources import resolve_source
from nanochat.metrics import read_metrics
from nanochat.runtime import init_runtime
from nanochat.tokenizer import Tokenizer
from nanochat.train.pretrain import pretrain

SETTINGS = {
    "muon": {},
    "muon+embedding": {"muon_embeddings": True},
    "adamw": {"optimizer": "adamw"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=PRESETS["tiny"].max_steps)
    args = ap.parse_args()
    os.environ["NANOCHAT_HOME"] = tempfile.mkdtemp(prefix="nanochat-optim-bench-")
    tok_cfg = TOKENIZER_PRESETS["tiny"]
    Tokenizer.train(resolve_source("offline").documents("train"), tok_cfg.vocab_size).save(tokenizer_dir("tiny"))
    rt = init_runtime(device="cpu")
    rows = []
    for name, changes in SETTINGS.items():
        cfg = copy.deepcopy(PRESETS["tiny"])
        cfg.run, cfg.max_steps, cfg.eval_every, cfg.save_every = name, args.steps, 0, 0
        for key, value in changes.items():
            setattr(cfg.optim, key, value)
        with contextlib.redirect_stdout(io.StringIO()):
            summary = pretrain(cfg, rt)
        losses = [r["loss"] for r in read_metrics(run_dir(name) / "metrics.jsonl") if "loss" in r]
        rows.append((name, sum(losses[-20:]) / len(losses[-20:]), summary["val_bpb"], summary["seconds"]))
        print(f"{name}: done", flush=True)
    print(f"\ntiny preset, {args.steps} steps × {PRESETS['tiny'].total_batch_tokens:,} tokens, same data and seed\n")
    print("| optimizer | final train loss | val bpb | vs muon (bpb) | seconds |\n|---|---:|---:|---:|---:|")
    for name, loss, bpb, seconds in rows:
        print(f"| {name} | {loss:.4f} | {bpb:.4f} | {bpb / rows[0][2]:.3f}× | {seconds:.0f} |")


if __name__ == "__main__":
    main()
