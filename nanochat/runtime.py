"""Where the code runs: device and dtype, torchrun process groups, seeding, rank-0 printing, peak
FLOP/s for MFU, and `nanochat info`, which shows all of it. Everything distributed goes through
`torch.distributed`."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from nanochat import __version__
from nanochat.config import InfoConfig, home, parse_config
from nanochat.errors import NanochatError

# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() by substring, first match wins, so specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 dense FLOP/s of a GPU by name, or None when unknown (MFU is then not reported)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = plain fp32
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @functools.cached_property  # read every training step; looked up once
    def peak_flops(self) -> float | None:
        """Peak bf16 FLOP/s of this process's GPU (None on CPU/MPS or an unknown GPU: no MFU then)."""
        return peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None

    def sync(self) -> None:
        """Wait for queued device work (for honest timings)."""
        _sync(self.device)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when launched by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise NanochatError("--device cuda was asked for, but CUDA is not available (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise NanochatError("--device mps was asked for, but MPS is not available (use --device cpu)")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles), so that
    oneDNN's bf16 matmuls run at about twice the fp32 rate instead of being emulated."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def device_memory(device: torch.device) -> int | None:
    """Bytes a training process can use on `device`: CUDA's free memory, MPS's recommended maximum,
    the machine's physical memory for the CPU; None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype | None:
    """`auto`: bf16 autocast where the hardware has bf16 matmuls — CUDA Ampere (sm80) and newer, and
    CPUs with AVX512-BF16 or AMX (on the 2-core development VM the tiny preset's training step is
    1.35× faster with the same validation bpb: benchmarks/README.md, Training recipe) — else fp32."""
    if name == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        else:
            bf16 = device.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if bf16 else None
    return {"bfloat16": torch.bfloat16, "float32": None}[name]


# The fused attention kernels worth trying, in PyTorch's own order of preference; MATH (explicit
# q·kᵀ, mask, softmax, ·v) runs everywhere and is always the last resort.
FUSED_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def fastest_attention(device: torch.device, heads: int, kv_heads: int, seq_len: int, head_dim: int,
                      dtype: torch.dtype, repeats: int = 3) -> list[SDPBackend]:
    """The SDPA backends that run causal attention of this shape (one row) on `device`, fastest
    first by the median of `repeats` timed forward + backward passes, then MATH as the fallback:
    the order for `torch.nn.attention.sdpa_kernel(..., set_priority=True)`. Which kernel wins
    depends on the GPU, the head size and the torch build (cuDNN's attention beats flash on some
    Hopper set-ups and not on others), so it is measured rather than assumed; a backend that
    cannot run this shape (no GQA, no bf16, not on this device) is left out."""
    shape = (1, heads, seq_len, head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn((1, kv_heads, seq_len, head_dim), device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))

    def attend() -> None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        y.backward(torch.ones_like(y))

    timings: dict[SDPBackend, float] = {}
    for backend in FUSED_ATTENTION:
        try:
            with torch.nn.attention.sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # each refusal explains itself in a warning
                attend()  # warm-up (and the refusal, if this backend cannot run the shape)
                samples = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    attend()
                    _sync(device)
                    samples.append(time.perf_counter() - t0)
        except RuntimeError:
            continue
        timings[backend] = statistics.median(samples)
    return [*sorted(timings, key=timings.__getitem__), SDPBackend.MATH]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def init_runtime(device: str = "auto", dtype: str = "auto", seed: int | None = None) -> Runtime:
    """Pick device and dtype, join the torchrun process group if there is one, and seed.

    Each rank is seeded with `seed + rank`, so ranks draw different random numbers (dropout,
    sampling); anything that must agree across ranks (the initial weights) is broadcast from rank 0
    (`train.loop.broadcast_weights`) or drawn from an explicitly seeded generator.
    """
    env = torchrun_env()
    rank, local_rank, world_size = env or (0, 0, 1)
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if env is not None and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    if seed is not None:
        seed_everything(seed + rank)
    return Runtime(dev, pick_dtype(dev, dtype), rank, local_rank, world_size)


_final_barrier: list = []  # the last barrier's handle, held until the interpreter exits (see teardown)


def teardown() -> None:
    """Leave the torchrun process group, if there is one.

    On the normal path every rank first meets at a barrier whose handle is kept for the rest of the
    process. Why: gloo's worker threads free each finished collective themselves, and freeing a
    tensor that Python has seen takes the GIL; a worker thread that gets there once the interpreter
    has begun to shut down is stopped inside a destructor and the whole process aborts ("terminate
    called without an active exception": 1 run in 9 of the 4-rank optimizer test on 2 cores, with
    the core dump showing a gloo thread freeing an all-gather). A gloo barrier completes only after
    every collective issued before it and keeps their memory alive until it is freed itself, so with
    its handle held here that happens on this thread, while the interpreter still runs.

    While an exception propagates (teardown in a `finally`), there is no barrier: the other ranks
    may never reach one, and this rank must exit for torchrun to stop them.
    """
    if not dist.is_initialized():
        return
    if sys.exc_info()[0] is None:
        work = dist.barrier(async_op=True)
        work.wait()
        _final_barrier.append(work)
    dist.destroy_process_group()


def is_master() -> bool:
    env = torchrun_env()
    return env is None or env[0] == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_master():
        print(*args, **kwargs, flush=True)


def describe() -> dict:
    """What `nanochat info` shows: versions, devices, torchrun and NANOCHAT_HOME."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({
                "type": "cuda",
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "peak_bf16_tflops": (peak_flops(p.name) or 0) / 1e12 or None,
            })
    elif torch.backends.mps.is_available():
        devices.append({"type": "mps", "name": "Apple GPU"})
    devices.append({"type": "cpu", "name": _cpu_name(), "cores": os.cpu_count(), "bf16_matmul": cpu_has_native_bf16()})
    env = torchrun_env()
    nc_home = home()
    probe = nc_home if nc_home.exists() else next(p for p in nc_home.parents if p.exists())
    return {
        "nanochat": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "default_device": str(pick_device()),
        "default_dtype": str(pick_dtype(pick_device()) or torch.float32).removeprefix("torch."),
        "devices": devices,
        "torchrun": None if env is None else {"rank": env[0], "local_rank": env[1], "world_size": env[2]},
        "home": str(nc_home),
        "home_free_gib": round(shutil.disk_usage(probe).free / 2**30, 1),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info_cli(argv: list[str]) -> int:
    """`nanochat info`."""
    cfg = parse_config(InfoConfig, argv, prog="nanochat info", description="Show the environment nanochat runs in.")
    info = describe()
    if cfg.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("nanochat", info["nanochat"]), ("torch", f"{info['torch']} (CUDA {info['cuda'] or 'none'})"),
            ("numpy", info["numpy"]), ("default device", info["default_device"])]
    for d in info["devices"]:
        extra = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("type", "name") and v is not None)
        rows.append((f"device {d['type']}", d["name"] + (f" ({extra})" if extra else "")))
    tr = info["torchrun"]
    rows.append(("torchrun", "no" if tr is None else f"rank {tr['rank']} of {tr['world_size']}, "
                                                      f"local rank {tr['local_rank']}"))
    rows.append(("NANOCHAT_HOME", f"{info['home']} ({info['home_free_gib']} GiB free)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
