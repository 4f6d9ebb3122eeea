"""What every training stage shares: batch arithmetic and one optimizer step over micro-batches.

Normalisation. A step's loss is the mean over *all* supervised tokens of the step — every
micro-batch on every rank — not a mean of per-micro-batch means. Each micro-batch's summed loss
is divided by the global count of supervised tokens (one all-reduce of a scalar per step), and
multiplied by the world size because DDP averages gradients over ranks. So 1 process × 8
micro-batches, 8 processes × 1, and chat batches where some rows have few (or zero) supervised
tokens all produce the same gradient as one big batch, and a micro-batch with nothing to learn
contributes exactly zero instead of a NaN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from nanochat.config import ConfigError
from nanochat.runtime import Runtime


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step; refuses settings that do not divide evenly."""
    per_micro_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_micro_step:
        raise ConfigError(
            f"--total-batch-tokens {total_batch_tokens} is not a multiple of --micro-batch × sequence length × "
            f"ranks = {micro_batch} × {seq_len} × {world_size} = {per_micro_step}; pick a micro-batch that "
            f"divides it (e.g. --micro-batch {max(1, micro_batch // 2)}) or change --total-batch-tokens")
    return total_batch_tokens // per_micro_step


def step_rates(tokens: int, seconds: float, flops_per_token: int, rt: Runtime) -> tuple[float, float | None]:
    """(tokens/s of all ranks, model FLOPs utilisation or None when the device's peak is unknown) of
    a step that processed `tokens` positions in all, forward and backward, in `seconds`."""
    tok_per_s = tokens / seconds
    peak = rt.peak_flops
    return tok_per_s, (flops_per_token * tok_per_s / (peak * rt.world_size) if peak else None)


def rates_postfix(loss: float, tok_per_s: float, mfu: float | None) -> dict[str, str]:
    """What a training progress bar shows after each step."""
    return {"loss": f"{loss:.3f}", "tok_s": f"{tok_per_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu is not None else {})}


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def train_step(model: nn.Module, optimizer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               accum_steps: int, rt: Runtime) -> tuple[float, int]:
    """Run `accum_steps` forward/backward passes and one optimizer step.

    `model` may be wrapped in DistributedDataParallel (gradients are then synchronised only on
    the last micro-batch). Returns (mean loss over the step's supervised tokens, their count);
    when no token of the step is supervised the optimizer is not stepped.
    """
    micro = [next(batches) for _ in range(accum_steps)]
    n_supervised = _all_reduce_sum(sum((y != -1).sum() for _, y in micro).to(rt.device, torch.float32))
    scale = rt.world_size / n_supervised.clamp(min=1)
    total = torch.zeros((), device=rt.device)
    for i, (x, y) in enumerate(micro):
        last = i == accum_steps - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with rt.autocast():
                loss_sum = model(x, y, loss_reduction="sum")
            (loss_sum * scale).backward()
        total += loss_sum.detach()
    total = _all_reduce_sum(total)
    count = int(n_supervised.item())
    if count:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item() / max(count, 1), count
