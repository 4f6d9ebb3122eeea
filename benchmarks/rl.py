"""Does RL help? Held-out pass@1 of a run's SFT model before and after `nanochat rl`, over seeds.

    uv run python benchmarks/rl.py                          # run `tiny` (the speedrun's), seeds 1 and 2
    uv run python benchmarks/rl.py --run tiny --seeds 1 2 3 --max-steps 80
    uv run python benchmarks/rl.py --prompts-per-step 16 --samples 4   # the same 64 completions a step, regrouped

For each seed the run's SFT checkpoint is copied into a fresh run `<run>-rl-s<seed>` and RL runs there
with the preset's settings (overridable). The peer is the SFT model itself: the RL stage measures
pass@1 and pass@k on the same held-out questions with the same sampling settings before its first
step and after its last. The held-out questions are the first --eval-items of each task's
validation split. Printed: one row per seed (before, after, the change in points, wall-clock) and
the mean, plus each seed's reward curve (the mean reward of every step's completions) as a sparkline.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import time

from nanochat.config import RL_PRESETS, run_dir
from nanochat.metrics import read_metrics
from nanochat.runs import stage_dir
from nanochat.runtime import init_runtime
from nanochat.train.rl import train_rl

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 30) -> str:
    """Rewards (0 to 1) on a linear scale, averaged into at most `width` characters."""
    chunks = [values[i * len(values) // width:(i + 1) * len(values) // width] for i in range(width)] \
        if len(values) > width else [[v] for v in values]
    return "".join(BARS[min(len(BARS) - 1, int(statistics.mean(c) * len(BARS)))] for c in chunks if c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="tiny", help="the run whose SFT model RL starts from")
    parser.add_argument("--preset", default="tiny", choices=sorted(RL_PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--eval-items", type=int, default=None)
    parser.add_argument("--lr-scale", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--normalise-advantages", action="store_true")
    args = parser.parse_args()
    sft = stage_dir(args.run, "sft")
    if not sft.is_dir():
        raise SystemExit(f"run '{args.run}' has no SFT model in {sft}: run `nanochat speedrun` first")
    overrides = {k: v for k, v in {"max_steps": args.max_steps, "tasks": args.tasks, "eval_items": args.eval_items,
                                   "lr_scale": args.lr_scale, "temperature": args.temperature,
                                   "prompts_per_step": args.prompts_per_step, "samples": args.samples}.items()
                 if v is not None}
    if args.normalise_advantages:
        overrides["normalise_advantages"] = True
    rows = []
    for seed in args.seeds:
        name = f"{args.run}-rl-s{seed}"
        shutil.rmtree(run_dir(name), ignore_errors=True)
        shutil.copytree(sft, stage_dir(name, "sft"))
        cfg = dataclasses.replace(RL_PRESETS[args.preset], run=name, seed=seed, **overrides)
        rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype, seed=seed)
        start = time.perf_counter()
        summary = train_rl(cfg, rt)
        seconds = time.perf_counter() - start
        curve = [r["reward"] for r in read_metrics(run_dir(name) / "metrics.jsonl")
                 if r.get("stage") == "rl" and "reward" in r]
        for key in sorted(k for k in summary if "_pass@" in k and not k.startswith("before_")):
            rows.append((seed, key, summary[f"before_{key}"], summary[key], seconds, curve))
    print(f"\nRL from run '{args.run}' ({args.preset} preset{', ' + str(overrides) if overrides else ''})\n")
    print("| seed | metric | SFT (before) | RL (after) | change, points | seconds | reward curve |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for seed, key, before, after, seconds, curve in rows:
        print(f"| {seed} | {key} | {before:.3f} | {after:.3f} | {100 * (after - before):+.1f} | {seconds:.0f} | "
              f"{sparkline(curve, 30)} {curve[0]:.2f}→{curve[-1]:.2f} |")
    for key in sorted({r[1] for r in rows}):
        changes = [100 * (after - before) for _, k, before, after, _, _ in rows if k == key]
        print(f"| mean | {key} | | | {statistics.mean(changes):+.1f} | | |")


if __name__ == "__main__":
    main()
