"""Training throughput of the GPT: forward + backward tokens/s and MFU.

    python benchmarks/model.py                 # CPU: the tiny preset; CUDA too when there is a GPU
    python benchmarks/model.py --device cpu --steps 5

MFU = tokens/s × GPT.flops_per_token() / peak FLOP/s (the PaLM accounting nanochat also reports).
On CUDA: d12 and d20 (vocab 65,536, sequence 2048), bf16 autocast, torch.compile; peak from
nanochat.runtime.peak_flops. On CPU: the tiny preset (its 4,096 vocabulary) in fp32 against an *estimated*
peak of threads × clock × FP32 FLOPs per cycle from the SIMD width (AVX-512: 64, AVX2+FMA: 32):
/proc/cpuinfo's current clock, not a measured roofline, so read that MFU as rough.

The peer, measured side by side: the same model with attention on PyTorch's MATH backend (explicit
q·kᵀ, mask, softmax, ·v) instead of the fused flash / memory-efficient kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanochat.config import PRESETS, TOKENIZER_PRESETS, ModelConfig
from nanochat.gpt import GPT
from nanochat.memory import choose_micro_batch
from nanochat.runtime import device_memory, init_runtime, peak_flops


def cpu_peak_flops() -> float | None:
    """Threads × clock × FP32 FLOPs per cycle per core (two FMA units × SIMD lanes × 2), a guess."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags and "fma" in flags else 16
    return torch.get_num_threads() * max(mhz, default=0) * 1e6 * per_cycle or None


def measure(shape: ModelConfig, vocab_size: int, batch: int, device: torch.device, dtype: torch.dtype | None,
            compile: bool, math_attention: bool, steps: int, warmup: int) -> tuple[float, int, int]:
    """(tokens/s, batch, FLOPs per token) of forward + backward on one random batch; halves the batch on OOM."""
    torch.manual_seed(0)
    model = GPT(shape, vocab_size).to(device)
    step_fn = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    attention = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    T = shape.sequence_len
    while True:
        x = torch.randint(vocab_size, (batch, T), device=device)
        y = torch.randint(vocab_size, (batch, T), device=device)
        try:
            with attention:
                for i in range(warmup + steps):
                    if i == warmup:
                        sync(device)
                        t0 = time.perf_counter()
                    with autocast:
                        loss = step_fn(x, y)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                sync(device)
            return steps * batch * T / (time.perf_counter() - t0), batch, model.flops_per_token()
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU rows always, CUDA rows when a GPU is present")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 5 CPU, 20 CUDA)")
    args = parser.parse_args()

    rows = []  # (device, model, attention, dtype, compile, batch, T, tok/s, flops/token, peak)
    if args.device in ("auto", "cpu"):
        tiny = PRESETS["tiny"]
        vocab = TOKENIZER_PRESETS["tiny"].vocab_size
        peak = cpu_peak_flops()
        for math_attention in (False, True):
            tps, batch, fpt = measure(tiny.model, vocab, tiny.micro_batch // 2, torch.device("cpu"), None, False,
                                      math_attention, args.steps or 5, warmup=2)
            rows.append(("cpu", "tiny", "math (peer)" if math_attention else "sdpa", "fp32", "no", batch,
                         tiny.model.sequence_len, tps, fpt, peak))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        rt = init_runtime("cuda")
        peak = peak_flops(torch.cuda.get_device_name(rt.device))
        torch.backends.cuda.matmul.allow_tf32 = True
        for name in ("d12", "d20"):
            preset = PRESETS[name]
            for math_attention in (False, True):
                micro = choose_micro_batch(preset, 65536, 1, True, device_memory(rt.device), str(rt.device))
                tps, batch, fpt = measure(preset.model, 65536, micro, rt.device, torch.bfloat16, True,
                                          math_attention, args.steps or 20, warmup=3)
                rows.append(("cuda", name, "math (peer)" if math_attention else "sdpa", "bf16", "yes", batch,
                             preset.model.sequence_len, tps, fpt, peak))
                torch._dynamo.reset()
                torch.cuda.empty_cache()

    device_names = {"cpu": f"{os.cpu_count()} cores, {torch.get_num_threads()} threads"}
    if torch.cuda.is_available():
        device_names["cuda"] = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}; " + "; ".join(f"{k}: {v}" for k, v in device_names.items()))
    header = f"{'device':<6} {'model':<5} {'attention':<12} {'dtype':<5} {'compile':<7} {'batch':>9} " \
             f"{'tok/s':>10} {'TFLOP/s':>8} {'MFU':>7}"
    print(header)
    print("-" * len(header))
    for device, model, attention, dtype, compiled, batch, T, tps, fpt, peak in rows:
        achieved = tps * fpt
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        if device == "cpu" and peak:
            mfu += " est"
        print(f"{device:<6} {model:<5} {attention:<12} {dtype:<5} {compiled:<7} {f'{batch}×{T}':>9} "
              f"{tps:>10,.0f} {achieved / 1e12:>8.3f} {mfu:>7}")
    for i in range(0, len(rows), 2):  # fused kernels vs the explicit-matmul peer, same model and machine
        print(f"{rows[i][0]} {rows[i][1]}: SDPA kernels run {rows[i][7] / rows[i + 1][7]:.2f}× the tokens/s of "
              "explicit-matmul attention")
    if any(r[0] == "cpu" for r in rows):
        peak = rows[0][9]
        print("CPU MFU is against an estimated peak" + (f" of {peak / 1e9:.0f} GFLOP/s" if peak else " (unknown)")
              + " (threads × clock × SIMD FLOPs/cycle); CUDA peaks are the data-sheet dense bf16 figures.")


if __name__ == "__main__":
    main()
