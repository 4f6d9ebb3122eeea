"""How much does leaving zero-advantage completions out of RL's update save? One RL step's update,
timed both ways on the same rollouts.

    uv run python benchmarks/rl_update.py                  # run `tiny` (the speedrun's), 8 steps' rollouts
    uv run python benchmarks/rl_update.py --steps 12 --repeats 3

The rollouts are those of the run's SFT model on the RL preset's first `--steps` steps (its
questions, seeds and sampling settings). Each step's update runs on two copies of the model, in
turn: the peer puts every completion through the forward and backward pass (the update before
this change), the other only those whose advantage is not 0 (`update_batches`, what `nanochat rl`
does). Both give the same weights (tests/test_rl.py); printed are the median seconds of each, their
ratio, the median rollout time, and what the whole step (rollouts + update) costs each way.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from nanochat.config import RL_PRESETS
from nanochat.engine import Engine
from nanochat.evaluate.passk import Questions, sample_completions, score
from nanochat.optim import build_optimizer
from nanochat.runs import load_stage_model
from nanochat.runtime import init_runtime
from nanochat.train.chat import scaled_optim
from nanochat.train.loop import train_step
from nanochat.train.rl import group_advantages, rollout_rows, update_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="tiny", help="the run whose SFT model samples the rollouts")
    parser.add_argument("--preset", default="tiny", choices=sorted(RL_PRESETS))
    parser.add_argument("--steps", type=int, default=8, help="RL steps whose rollouts are timed")
    parser.add_argument("--repeats", type=int, default=2, help="updates of each step's rollouts, each way")
    args = parser.parse_args()
    cfg = dataclasses.replace(RL_PRESETS[args.preset], run=args.run)
    rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype, seed=cfg.seed)
    model, tok, _ = load_stage_model(cfg.run, "sft", rt)
    engine, questions = Engine(model, tok, rt), Questions(cfg.tasks, "train", cfg.seed)
    rows = cfg.prompts_per_step * cfg.samples
    accum = rows // cfg.micro_batch
    steps, rollout_seconds = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        prompts, rollouts, names, convs = sample_completions(
            engine, questions, range(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step), cfg,
            cfg.samples, step)
        rollout_seconds.append(time.perf_counter() - start)
        rewards = torch.tensor([score(tok, n, c, t) for n, c, (t, _) in zip(names, convs, rollouts, strict=True)])
        advantages = group_advantages(rewards.view(-1, cfg.samples), cfg.normalise_advantages).view(-1).tolist()
        every = [rollout_rows(prompts[i:i + cfg.micro_batch], rollouts[i:i + cfg.micro_batch],
                              advantages[i:i + cfg.micro_batch], rt.device) for i in range(0, rows, cfg.micro_batch)]
        skipping, updated = update_batches(prompts, rollouts, advantages, accum, rt.device)
        steps.append((every, skipping, updated))
    optim = scaled_optim(cfg.optim, cfg.lr_scale)
    ways = {}
    for name in ("every row", "nonzero advantage only"):
        clone = copy.deepcopy(model)
        ways[name] = (clone, build_optimizer(clone, optim, rows * cfg.max_tokens), [])
    for _ in range(args.repeats):
        for every, skipping, _ in steps:
            for name, batches in (("every row", every), ("nonzero advantage only", skipping)):
                m, opt, seconds = ways[name]
                start = time.perf_counter()
                train_step(m, opt, iter(batches), accum, rt)
                rt.sync()
                seconds.append(time.perf_counter() - start)
    rollout = statistics.median(rollout_seconds)
    base, fast = (statistics.median(ways[n][2]) for n in ("every row", "nonzero advantage only"))
    updated = statistics.median(u / rows for *_, u in steps)
    print(f"\nRL update, run '{args.run}' ({args.preset} preset: {cfg.prompts_per_step} questions × {cfg.samples} "
          f"completions), {args.steps} steps' rollouts × {args.repeats}; median share of rows updated {updated:.0%}\n")
    print("| update | median s | vs every row | step (rollouts + update) s | step vs every row |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in (("every row (peer)", base), ("nonzero advantage only", fast)):
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}× | {rollout + seconds:.3f} | "
              f"{(rollout + base) / (rollout + seconds):.2f}× |")
    print(f"\nmedian rollout time {rollout:.3f} s a step")


if __name__ == "__main__":
    main()
