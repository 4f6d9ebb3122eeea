"""Sampling cost per decode step: the engine's batched sampler against per-row `torch.multinomial`.

    uv run python benchmarks/sampler.py                       # 1, 8, 16 and 64 rows; vocabularies 4,096 and 65,536
    uv run python benchmarks/sampler.py --rows 64 --vocab 4096 --repeats 500

Every row has its own settings and random stream (a server's requests, RL's completions), so a
step must sample each row on its own terms. The peer is how the engine sampled before: row by
row, top-k masking, softmax and `torch.multinomial` with the row's own generator. nanochat's
`engine.sample` draws one uniform number per row (from the row's stream, drawn ahead) and picks
every row's token in one batch of tensor operations (inverse transform sampling). Both sample the
same distribution (tests/test_engine.py checks the engine's frequencies against it). Printed:
median microseconds per step over --repeats steps, both on the same logits (the peer's steps,
then the engine's), and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanochat.engine import Sampling, sample


def multinomial_row(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """The peer: one row, as the engine sampled before (temperature, top-k mask, softmax, multinomial)."""
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[0, 0])


def peer_step(logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator]) -> list[int]:
    return [multinomial_row(logits[i:i + 1], s, g) for i, (s, g) in enumerate(zip(settings, generators, strict=True))]


def engine_step(logits: torch.Tensor, settings: list[Sampling], draws: torch.Tensor) -> list[int]:
    return sample(logits, settings, draws).tolist()


def median_us(fn, repeats: int, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-k", type=int, default=50, help="0: none (the whole vocabulary, unsorted)")
    args = parser.parse_args()
    print(f"\nsampling one token per row, temperature {args.temperature}, top-k {args.top_k}, CPU, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} steps\n")
    print("| vocabulary | rows | per-row multinomial (peer) µs | batched inverse-CDF µs | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for vocab in args.vocab:
        for rows in args.rows:
            logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 4
            settings = [Sampling(temperature=args.temperature, top_k=args.top_k or None, seed=i) for i in range(rows)]
            generators = [torch.Generator().manual_seed(i) for i in range(rows)]
            draws = torch.rand(rows, generator=torch.Generator().manual_seed(0))
            peer = median_us(peer_step, args.repeats, logits, settings, generators)
            ours = median_us(engine_step, args.repeats, logits, settings, draws)
            print(f"| {vocab:,} | {rows} | {peer:,.0f} | {ours:,.0f} | {peer / ours:.1f}× |")


if __name__ == "__main__":
    main()
