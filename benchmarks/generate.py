"""Generation speed: decode tokens/s with the KV cache against naive recompute, and latency per token.

    uv run python benchmarks/generate.py                    # tiny shape on CPU; d20 on the GPU if there is one
    uv run python benchmarks/generate.py --model d20 --batch 1 8
    uv run python benchmarks/generate.py --new-tokens 64    # a quick look

Both sides greedy-decode --new-tokens tokens after a random prompt of --prompt-len tokens, with the
same model and weights:

- cache: prefill the prompt once into nanochat's KVCache, then one token per forward pass (the
  Engine's loop, without its sampling and tool bookkeeping);
- naive, the peer: no cache; each step runs the whole sequence so far through the model and keeps
  the last position's logits.

tok/s = rows × new tokens / wall time from the prompt to the last token (both sides start with a
full pass over the prompt). Both synchronize the device every step, as a real decode loop must (it
reads each token on the host to decide whether to stop). ms/token: each cached decode step timed
alone, p50 and p90. The naive side is fed the cache's tokens (the same work as running free) and its
own greedy choice is checked against them at every step: all must agree in fp32; in bf16 a choice
may differ only where the two top logits are within bf16 rounding of each other.

Weights are random, so no checkpoint is needed, but drawn so that every block matters: the
training init zeroes the blocks' output projections, which would leave the model blind to its
context and the agreement check empty. Shapes: `tiny` is the tiny preset's (4 layers, 128 wide,
4,096 vocabulary) with a sequence length of at least prompt + new tokens, in fp32; `d20` is 20
layers, 1,280 wide, 65,536 vocabulary, with bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import statistics
import time

import torch
from torch import nn

from nanochat.config import PRESETS, TOKENIZER_PRESETS
from nanochat.gpt import GPT

VOCAB = {"tiny": TOKENIZER_PRESETS["tiny"].vocab_size, "d20": 65536}
BF16_TIE = 0.125  # bf16's spacing for logits of 8 to 16 (the soft-cap is 15): closer than this is a tie


def random_model(name: str, context: int, device: torch.device) -> GPT:
    shape = PRESETS[name].model
    shape = dataclasses.replace(shape, sequence_len=max(shape.sequence_len, context))
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(shape, VOCAB[name])
        for block in model.blocks:  # unit-scale updates from every block, not the identity
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        nn.init.normal_(model.lm_head.weight, std=shape.n_embd ** -0.5)  # unit-scale logits: clear greedy choices
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_cached(model: GPT, prompt: torch.Tensor, new: int, dtype: torch.dtype | None
                  ) -> tuple[torch.Tensor, float, list[float]]:
    """(tokens (B, new), seconds in all, seconds of each decode step after the prefill)."""
    device, autocast = prompt.device, _autocast(prompt.device, dtype)
    cache = model.new_kv_cache(prompt.size(0), prompt.size(1) + new, dtype=dtype or torch.float32)
    sync(device)
    start = time.perf_counter()
    with autocast:
        out = [model(prompt, kv_cache=cache)[:, -1].argmax(-1)]
    sync(device)
    marks = [time.perf_counter()]
    for _ in range(new - 1):
        with autocast:
            out.append(model(out[-1][:, None], kv_cache=cache)[:, -1].argmax(-1))
        sync(device)
        marks.append(time.perf_counter())
    return torch.stack(out, 1), marks[-1] - start, [b - a for a, b in itertools.pairwise(marks)]


@torch.inference_mode()
def decode_naive(model: GPT, prompt: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | None
                 ) -> tuple[float, int, float]:
    """Recompute the whole sequence for every token, fed `reference`'s tokens; (seconds, choices equal
    to the reference's, largest logit gap between its own choice and the reference's)."""
    device, autocast = prompt.device, _autocast(prompt.device, dtype)
    seq = torch.cat([prompt, reference], 1)
    agree = torch.zeros((), dtype=torch.long, device=device)
    gap = torch.zeros((), device=device)
    sync(device)
    start = time.perf_counter()
    for i in range(reference.size(1)):
        with autocast:
            logits = model(seq[:, :prompt.size(1) + i])[:, -1]
        agree += (logits.argmax(-1) == reference[:, i]).sum()  # kept on the device: no extra host round trip
        gap = torch.maximum(gap, (logits.max(-1).values - logits.gather(1, reference[:, i:i + 1])[:, 0]).max())
        sync(device)
    return time.perf_counter() - start, int(agree), float(gap)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def measure(model: GPT, batch: int, prompt_len: int, new: int, dtype: torch.dtype | None, device: torch.device
            ) -> dict:
    prompt = torch.randint(model.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    decode_naive(model, prompt, decode_cached(model, prompt, 4, dtype)[0], dtype)  # warm-up: lazy inits, kernels
    tokens, cached_s, steps = decode_cached(model, prompt, new, dtype)
    naive_s, agree, gap = decode_naive(model, prompt, tokens, dtype)
    tie = 0.0 if dtype is None else BF16_TIE
    assert gap <= tie, f"naive recompute chose differently from the cache by a logit gap of {gap:.4f}"
    ms = [s * 1e3 for s in steps]
    return {"batch": batch, "cached": batch * new / cached_s, "naive": batch * new / naive_s,
            "p50": statistics.median(ms), "p90": statistics.quantiles(ms, n=10)[-1], "agree": agree / tokens.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["auto", "tiny", "d20"], default="auto",
                        help="auto: d20 on CUDA, tiny on CPU")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="rows decoded together, e.g. --batch 1 8")
    args = parser.parse_args()
    if args.prompt_len < 1 or args.new_tokens < 3 or min(args.batch) < 1:
        parser.error("--prompt-len and --batch must be ≥ 1, --new-tokens ≥ 3 (two decode steps for the percentiles)")

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    name = args.model if args.model != "auto" else "d20" if device.type == "cuda" else "tiny"
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model = random_model(name, args.prompt_len + args.new_tokens, device)
    rows = [measure(model, b, args.prompt_len, args.new_tokens, dtype, device) for b in args.batch]

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__}; {where}; {name}: {model.num_params() / 1e6:.1f}M parameters, random weights, "
          f"{'bf16 autocast' if dtype else 'fp32'}\n")
    print("| model | device | batch | prompt | new tokens | tok/s with cache | tok/s without | speed-up "
          "| ms/token p50 (cache) | p90 | greedy tokens agree |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {name} | {device.type} | {r['batch']} | {args.prompt_len} | {args.new_tokens} | {r['cached']:,.0f} "
              f"| {r['naive']:,.1f} | {r['cached'] / r['naive']:.1f}× | {r['p50']:.2f} | {r['p90']:.2f} "
              f"| {r['agree']:.1%} |")
    print("\nms/token is one decode step of the whole batch (one new token per row).")


if __name__ == "__main__":
    main()
