"""Would fusing a block's input projections pay? q/k/v as one matmul, and SwiGLU's gate/up as one.

    uv run python benchmarks/fusion.py                 # the tiny preset's block on the CPU
    uv run python benchmarks/fusion.py --shape d20 --tokens 2048
    python benchmarks/fusion.py --device cuda --shape d20   # on a GPU: 16 rows × 2048 positions

A block multiplies its normed input by three matrices for attention (q, k, v) and, with SwiGLU, two
for the MLP (up, gate). One matmul against the matrices stacked row-wise does the same work in one
kernel and reads the input once. The parameters must stay separate matrices, since Muon
orthogonalises each on its own (a stacked [q; k; v] would be orthogonalised as one matrix, a
different update), so the fused side concatenates the weights every step, as the model would.

Both sides: forward + backward of the projections alone for --tokens rows (the micro-batch's
positions), in fp32 eager and compiled, and in bf16 autocast where the device multiplies bf16 in
hardware (CUDA, or a CPU with AVX512-BF16/AMX); median of --repeats. Printed: ms per step and
fused / separate time (below 1: fusion wins).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nanochat.config import PRESETS
from nanochat.runtime import Runtime, cpu_has_native_bf16, pick_device


def separate(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.linear(x, w).sum() for w in weights)


def fused(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    out = F.linear(x, torch.cat(weights))
    return sum(part.sum() for part in out.split([w.size(0) for w in weights], dim=-1))


def time_side(fn, x: torch.Tensor, weights: list[torch.Tensor], dtype: torch.dtype | None, repeats: int) -> float:
    rt = Runtime(x.device, dtype)
    samples = []
    for i in range(repeats + 2):  # two warm-ups (the compile, the first allocation)
        rt.sync()
        t0 = time.perf_counter()
        with rt.autocast():
            loss = fn(x, weights)
        loss.backward()
        rt.sync()
        if i >= 2:
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=None, help="rows (default: the preset's micro-batch positions)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    preset = PRESETS[args.shape]
    cfg = preset.model
    tokens = args.tokens or (preset.micro_batch if isinstance(preset.micro_batch, int) else 16) * cfg.sequence_len
    C, K, hidden = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden
    groups = {"q/k/v": [C, K, K], "up/gate": [hidden, hidden]}
    bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    dtypes = {"fp32": None, **({"bf16": torch.bfloat16} if bf16 else {})}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.shape}: {tokens} rows of width {C}, {where}\n")
    print("| projections | dtype | mode | separate ms | fused ms | fused / separate |")
    print("|---|---|---|---:|---:|---:|")
    for name, rows in groups.items():
        torch.manual_seed(0)
        x = torch.randn(tokens, C, device=device, requires_grad=True)
        weights = [torch.randn(r, C, device=device, requires_grad=True) for r in rows]
        for dname, dtype in dtypes.items():
            for mode in ("eager", "compiled"):
                wrap = torch.compile if mode == "compiled" else (lambda f: f)
                a = time_side(wrap(separate), x, weights, dtype, args.repeats)
                b = time_side(wrap(fused), x, weights, dtype, args.repeats)
                print(f"| {name} | {dname} | {mode} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
