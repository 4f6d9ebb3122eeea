import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_model import fixed_rows, tiny_gpt
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanochat.runtime import (
    FUSED_ATTENTION,
    cpu_has_native_bf16,
    fastest_attention,
    init_runtime,
    peak_flops,
    pick_dtype,
)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future Accelerator") is None


def test_cpu_runtime_single_process_and_its_dtype_rule(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rt = init_runtime(device="cpu", seed=0)
    assert (rt.device.type, rt.rank, rt.world_size, rt.master) == ("cpu", 0, 1, True)
    assert rt.autocast_dtype is (torch.bfloat16 if cpu_has_native_bf16() else None)
    # auto: bf16 exactly where the CPU multiplies bf16 in hardware, whichever probe says so
    for avx512_bf16, amx, expect in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                     (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert pick_dtype(torch.device("cpu")) is expect
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probes: fp32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert pick_dtype(torch.device("cpu")) is None
    assert pick_dtype(torch.device("cpu"), "bfloat16") is torch.bfloat16  # explicit choices win
    assert init_runtime(device="cpu", dtype="float32").autocast_dtype is None
    with init_runtime(device="cpu", dtype="bfloat16").autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype is torch.bfloat16


def test_torchrun_two_process_gloo_all_reduce(tmp_path):
    worker = Path(__file__).with_name("_dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in records)
    assert all(r["sum"] == 3.0 for r in records)  # 1 + 2
    assert records[0]["draw"] != records[1]["draw"]  # per-rank seeds differ


def test_teardown_holds_the_last_barrier_only_on_the_normal_path(tmp_path):
    """teardown's barrier keeps gloo's worker threads from freeing collectives during interpreter
    shutdown (see its docstring); on an error path it must not wait for ranks that may be gone."""
    import torch.distributed as dist

    from nanochat import runtime

    def join():
        store = dist.FileStore(str(tmp_path / f"store{len(runtime._final_barrier)}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        dist.all_reduce(torch.ones(3), async_op=True).wait()

    held = len(runtime._final_barrier)
    join()
    runtime.teardown()
    assert not dist.is_initialized()
    assert len(runtime._final_barrier) == held + 1 and runtime._final_barrier[-1].is_completed()
    join()
    with pytest.raises(RuntimeError, match="a rank failed"):
        try:
            raise RuntimeError("a rank failed")
        finally:
            runtime.teardown()
    assert not dist.is_initialized()
    assert len(runtime._final_barrier) == held + 1  # no barrier while the error propagates


@pytest.mark.gpu
def test_cuda_runtime_uses_bf16_on_ampere():
    rt = init_runtime(device="cuda")
    expect = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else None
    assert rt.autocast_dtype is expect


def test_fastest_attention_orders_the_kernels_that_run_and_ends_with_math():
    cpu = torch.device("cpu")
    for kv_heads in (4, 2):  # plain and grouped-query attention
        order = fastest_attention(cpu, 4, kv_heads, 64, 16, torch.float32)
        assert order[-1] == SDPBackend.MATH and len(set(order)) == len(order)
        assert set(order[:-1]) <= set(FUSED_ATTENTION)
        assert SDPBackend.FLASH_ATTENTION in order  # the CPU's fused kernel
        assert SDPBackend.CUDNN_ATTENTION not in order  # a CUDA-only kernel is left out, not an error
    # the order is a valid priority for the model, compiled too
    model = tiny_gpt()
    x, y = fixed_rows(2)
    with sdpa_kernel(order, set_priority=True):
        compiled = torch.compile(model, backend="aot_eager")(x, y)
    torch.testing.assert_close(compiled, model(x, y))
