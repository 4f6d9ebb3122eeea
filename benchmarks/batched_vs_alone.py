"""How often a reply written in a continuous batch is token for token the one written alone.

    uv run python benchmarks/batched_vs_alone.py                  # run `tiny` (after `nanochat speedrun`)
    uv run python benchmarks/batched_vs_alone.py --dtypes float32 bfloat16 --requests 60

Each request keeps its own sampling settings and random stream and attends to its own tokens only,
so nothing of its neighbours reaches its reply but floating-point rounding: a matrix product's
last bits depend on the shape of the batch it is part of (the kernels sum in another order), and
where two tokens are nearly tied that can pick the other one; from there the replies part.

A fixed queue of requests (the serving benchmark's prompts, greedy and sampled, top-k or not,
max_tokens from 16 to 128) runs through a ContinuousBatch of --slots, and each request again
through Engine.generate on its own, and in static batches of --slots (Engine.generate, the
static batcher's way). Printed per dtype and batching: how many replies are identical to the
ones written alone, and for the others, after how many tokens they first differ.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from serve import PROMPTS

from nanochat.chat_format import render_for_completion
from nanochat.config import DeviceConfig, ModelSource
from nanochat.engine import ContinuousBatch, Sampling, load_engine
from nanochat.runtime import init_runtime


def first_difference(a: list[int], b: list[int]) -> int:
    """The index of the first token where two different replies part (or where the shorter ends)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="tiny")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in args.dtypes:
        rt = init_runtime("cpu", dtype)
        engine, name = load_engine(ModelSource(run=args.run, runtime=DeviceConfig(device="cpu")), rt)
        engine.model.eval()
        r = random.Random(args.seed)
        requests = [(render_for_completion(engine.tok, r.choice(PROMPTS)),
                     Sampling(max_tokens=r.choice([16, 64, 128]), temperature=r.choice([0.0, 0.8, 1.0]),
                              top_k=r.choice([None, 50]), seed=r.randrange(2**31)))
                    for _ in range(args.requests)]
        batch = ContinuousBatch(engine, args.slots)
        waiting, owner, batched = list(enumerate(requests)), {}, {}
        while waiting or batch.running:
            while waiting and batch.free:
                i, (prompt, sampling) = waiting.pop(0)
                (slot,) = batch.admit(prompt, sampling)
                owner[slot], batched[i] = i, []
            for slot, token, _ in batch.step():
                batched[owner[slot]].append(token)
        static = []  # the same requests in static batches of --slots (Engine.generate)
        for start in range(0, len(requests), args.slots):
            group = requests[start:start + args.slots]
            static += engine.complete([prompt for prompt, _ in group], [sampling for _, sampling in group])
        alone = [engine.complete([prompt], [sampling])[0] for prompt, sampling in requests]
        for how, replies in (("continuous", [batched[i] for i in range(len(requests))]), ("static", static)):
            parted = [first_difference(mine, own) for mine, own in zip(replies, alone, strict=True) if mine != own]
            where = (f"; the others part after {min(parted)}-{max(parted)} tokens (median "
                     f"{statistics.median(parted):g})") if parted else ""
            print(f"{name}, {dtype}, {how} batches of {args.slots}: {len(requests) - len(parted)} of {len(requests)} "
                  f"replies identical to the request's alone{where}", flush=True)


if __name__ == "__main__":
    main()
