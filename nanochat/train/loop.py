"""What every training stage shares: batch arithmetic, one optimizer step over micro-batches, and
the stage loop itself.

A stage (pretrain, midtrain, sft) builds its model, optimizer and batches and describes itself in
a `StagePlan`; `train_stage` does the rest the same way for all of them:

  resume or refuse   `--resume` continues the stage's newest checkpoint (model, optimizer, RNG,
                     data position) and is an error when there is none; a stage that already has
                     checkpoints is refused without `--resume`, so nothing is overwritten
  wrap               under torchrun, rank 0's weights broadcast to all ranks (no DDP: the sharded
                     optimizer sums the gradients itself, nanochat.optim); torch.compile
  every step         schedule, `train_step`, a stop naming the last good checkpoint when the loss
                     is NaN/inf, metrics.jsonl and the progress bar (loss, tok/s, MFU, ETA)
  cadence            the stage's own evaluation every `eval_every` steps, a checkpoint every
                     `save_every`, both at the last step; then the stage's closing evaluation
  always             the metrics logger and the batches closed, however the loop ends

Normalisation. A step's loss is the mean over *all* supervised tokens of the step — every
micro-batch on every rank — not a mean of per-micro-batch means. Each micro-batch's summed loss
is divided by the global count of supervised tokens (one all-reduce of a scalar per step), and
the optimizer sums the ranks' gradients (nanochat.optim's sharded Muon and AdamW). So 1 process × 8
micro-batches, 8 processes × 1, and chat batches where some rows have few (or zero) supervised
tokens all produce the same gradient as one big batch, and a micro-batch with nothing to learn
contributes exactly zero instead of a NaN.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import sdpa_kernel

from nanochat.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanochat.config import ConfigError, OptimConfig, run_dir
from nanochat.errors import NanochatError
from nanochat.gpt import GPT
from nanochat.metrics import MetricsLogger, progress
from nanochat.optim import apply_schedule
from nanochat.runs import get_stage, stage_dir, stage_name
from nanochat.runtime import Runtime, fastest_attention, print0


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step; refuses settings that do not divide evenly."""
    per_micro_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_micro_step:
        raise ConfigError(
            f"--total-batch-tokens {total_batch_tokens} is not a multiple of --micro-batch × sequence length × "
            f"ranks = {micro_batch} × {seq_len} × {world_size} = {per_micro_step}; pick a micro-batch that "
            f"divides it (e.g. --micro-batch {max(1, micro_batch // 2)}) or change --total-batch-tokens")
    return total_batch_tokens // per_micro_step


def step_rates(tokens: int, flops: float, seconds: float, rt: Runtime) -> tuple[float, float | None]:
    """(tokens/s of all ranks, model FLOPs utilisation or None when the device's peak is unknown) of
    a step that processed `tokens` positions and `flops` model FLOPs in all ranks, forward and
    backward, in `seconds`."""
    peak = rt.peak_flops
    return tokens / seconds, (flops / seconds / (peak * rt.world_size) if peak else None)


class _Counted:
    """A stage's batches, noting the shape (rows, width) of each one handed out: a step's tokens and
    FLOPs, with attention counted at the rows' real width (the chat stages' rows are narrower than
    the sequence length)."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        self.batches, self.shapes = batches, []

    def __next__(self) -> tuple[torch.Tensor, ...]:
        batch = next(self.batches)
        self.shapes.append(tuple(batch[0].shape))
        return batch

    def take(self, model: GPT, world_size: int) -> tuple[int, float]:
        """(positions, FLOPs) of the batches since the last call, times `world_size` (the other
        ranks' rows are as wide, up to their own padding)."""
        positions = sum(rows * width for rows, width in self.shapes)
        flops = sum(rows * width * model.flops_per_token(width) for rows, width in self.shapes)
        self.shapes = []
        return positions * world_size, flops * world_size


def rates_postfix(loss: float, tok_per_s: float, mfu: float | None) -> dict[str, str]:
    """What a training progress bar shows after each step."""
    return {"loss": f"{loss:.3f}", "tok_s": f"{tok_per_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu is not None else {})}


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def _supervised(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The supervised tokens a micro-batch counts for: its targets, or the count it carries."""
    return batch[3] if len(batch) > 3 else (batch[1] != -1).sum()


def train_step(model: nn.Module, optimizer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               accum_steps: int, rt: Runtime) -> tuple[float, int]:
    """Run `accum_steps` forward/backward passes and one optimizer step.

    Gradients stay on their rank until the optimizer step, which sums them over ranks (the
    optimizer is sharded under torchrun: `nanochat.optim.build_optimizer`). Returns (mean loss over
    the step's supervised tokens, their count); when no token of the step is supervised the
    optimizer is not stepped. A batch may carry a third tensor, per-position loss weights (the RL
    stage's advantages): the loss is then the weighted sum over the same global token count; and a
    fourth, the supervised tokens it stands for, counted in place of its targets (RL leaves rows
    whose weights are all zero out of the passes, but not out of the normaliser).
    """
    micro = [next(batches) for _ in range(accum_steps)]
    n_supervised = _all_reduce_sum(sum(_supervised(batch) for batch in micro).to(rt.device, torch.float32))
    # Read now, while the device is idle (the loop synchronised at the end of the last step), rather
    # than after the backward passes, which would stall the queue before the optimizer step.
    count = int(n_supervised.item())
    scale = 1 / n_supervised.clamp(min=1)
    total = torch.zeros((), device=rt.device)
    for x, y, *extra in micro:  # (x, y), or (x, y, per-position loss weights, count): RL's advantages
        with rt.autocast():
            loss_sum = model(x, y, loss_reduction="sum", **({"loss_weights": extra[0]} if extra else {}))
        (loss_sum * scale).backward()
        total += loss_sum.detach()
    total = _all_reduce_sum(total)
    if count:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item() / max(count, 1), count


# --------------------------------------------------------------------------------------------
# The stage loop


class Batches(Protocol):
    """What the loop needs of a stage's training batches (`DataLoader`, `ChatBatches`)."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


def _no_metrics(step: int) -> dict:
    return {}


@dataclass
class StagePlan:
    """One training stage, as the stage file builds it; `train_stage` runs it."""

    stage: str
    """"base", "mid" or "sft" (nanochat.runs.STAGES): names the checkpoints' folder and the metrics."""
    run: str
    model: GPT
    optimizer: torch.optim.Optimizer
    optim: OptimConfig
    """The learning-rate schedule's settings."""
    batches: Batches
    accum: int
    """Micro-batches per optimizer step on each rank."""
    total_steps: int
    config: dict
    """The stage's whole configuration: logged, and saved in every checkpoint's meta.json."""
    resume_keys: dict
    """Configuration a resumed stage must share with its checkpoint (others may change)."""
    meta: dict = field(default_factory=dict)
    """What else every checkpoint records (the tokenizer's identity, the starting stage …)."""
    resume: bool = False
    compile: bool = False
    varying_width: bool = False
    """Rows change width from step to step (SFT's padded batches): compile for any width at once
    rather than once per width."""
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 1
    evaluate: Callable[[int], dict] = _no_metrics
    """step -> metrics: the stage's own evaluation, every eval_every steps and at the last step
    (logged, and the latest saved with each checkpoint)."""
    conclude: Callable[[int], dict] = _no_metrics
    """step -> metrics: once, after the final checkpoint is written (the chat stages' probes)."""
    step_metrics: Callable[[], dict] = dict
    """Extra figures logged with every step (the pretraining loader's cropped fraction)."""
    opening: dict = field(default_factory=dict)
    """Figures measured before the first step (RL's held-out pass@k), logged at step 0 of a new stage."""


@dataclass
class StageResult:
    steps: int
    seconds: float
    evaluation: dict
    """The last evaluation's metrics."""
    conclusion: dict


def resume_or_refuse(plan: StagePlan) -> int:
    """The step to start from: 0 for a new stage, or the newest checkpoint's step with `--resume`
    (model, optimizer, RNG and batch position restored). Refuses `--resume` without a checkpoint,
    and a stage with checkpoints without `--resume`, each naming the fix."""
    out = stage_dir(plan.run, plan.stage)
    command = get_stage(plan.stage).command
    previous = latest_checkpoint(out)
    if previous is None:
        if plan.resume:
            raise NanochatError(f"--resume: run '{plan.run}' has no {plan.stage} checkpoint in {out} to resume; "
                                f"start `nanochat {command}` without --resume")
        return 0
    if not plan.resume:
        raise NanochatError(f"run '{plan.run}' already has {plan.stage} checkpoints (latest {previous.name}) in "
                            f"{out}; pass --resume to continue, or choose another --run")
    meta = load_checkpoint(previous, plan.model, plan.optimizer, expected_config=plan.resume_keys, restore_rng=True)
    if stage_name(meta.get("stage")) != plan.stage:
        raise NanochatError(f"{previous} is a {meta.get('stage')!r} checkpoint, not a {plan.stage} one")
    state = meta["rank_state"]
    # Checkpoints written before the stages shared this loop keyed the batch state by their kind.
    plan.batches.load_state_dict(state.get("data") or state.get("loader") or state["batches"])
    print0(f"resumed {plan.stage} of {plan.run} from {previous} (step {meta['step']} of {plan.total_steps})")
    return meta["step"]


def broadcast_weights(model: nn.Module) -> None:
    """Give every rank rank 0's parameters (each rank seeds its own random init differently)."""
    if dist.is_initialized():
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p, src=0)


def wrap_model(model: nn.Module, rt: Runtime, compile: bool, varying_width: bool = False) -> nn.Module:
    """The model the steps run, compiled if asked (with dynamic shapes when the rows' width varies,
    so a new width is no recompile). Under torchrun the ranks first agree on rank 0's weights; the
    model is not wrapped in DDP (the optimizer reduces the gradients), so the graph is whole and
    the rotary tables are not re-broadcast every forward. Evaluation runs the plain module: its
    shapes vary, and it runs too seldom to repay compiling."""
    if rt.distributed:
        broadcast_weights(model)
    if not compile:
        return model
    return torch.compile(model, dynamic=True if varying_width else None)


def attention_backends(model: GPT, rt: Runtime) -> contextlib.AbstractContextManager:
    """On CUDA, the SDPA backends measured fastest for the model's attention shape
    (`runtime.fastest_attention`), as the priority order for the whole stage; elsewhere PyTorch's
    own choice (the CPU has one fused kernel)."""
    if rt.device.type != "cuda":
        return contextlib.nullcontext()
    cfg = model.config
    order = fastest_attention(rt.device, cfg.n_head, cfg.kv_heads, cfg.sequence_len, cfg.head_dim,
                              rt.autocast_dtype or torch.float32)
    print0("attention kernels, fastest first: " + " > ".join(b.name.lower() for b in order))
    return sdpa_kernel(order, set_priority=True)


def train_stage(plan: StagePlan, rt: Runtime) -> StageResult:
    """Resume or start `plan`'s stage and train it to `total_steps` (see the module docstring)."""
    step = resume_or_refuse(plan)
    train_model = wrap_model(plan.model, rt, plan.compile, plan.varying_width)
    counted = _Counted(plan.batches)
    out = stage_dir(plan.run, plan.stage)
    evaluation: dict = {}
    conclusion: dict = {}
    logger = MetricsLogger(run_dir(plan.run) / "metrics.jsonl", config=plan.config, run_name=plan.run)
    bar = progress(total=plan.total_steps, initial=step, desc=get_stage(plan.stage).command, unit="step")
    started, first_step = time.time(), step
    if plan.opening and step == 0:
        logger.log(0, stage=plan.stage, **plan.opening)
    try:
        with attention_backends(plan.model, rt):
            while step < plan.total_steps:
                lr_mult = apply_schedule(plan.optimizer, step, plan.total_steps, plan.optim)
                t0 = time.perf_counter()
                loss, supervised = train_step(train_model, plan.optimizer, counted, plan.accum, rt)
                rt.sync()
                dt = time.perf_counter() - t0
                if not math.isfinite(loss):
                    last = latest_checkpoint(out)
                    raise NanochatError(
                        f"the {plan.stage} loss became {loss} at step {step + 1}: training diverged. "
                        + (f"The last good checkpoint is {last}; " if last else "No checkpoint was written yet; ")
                        + "lower the learning rates (--optim.matrix-lr, --optim.embedding-lr …, or --lr-scale in "
                          "the chat stages) and start again")
                step += 1
                # Every position of every row goes through the model, padding too.
                positions, flops = counted.take(plan.model, rt.world_size)
                tok_per_s, mfu = step_rates(positions, flops, dt, rt)
                elapsed = time.time() - started
                logger.log(step, stage=plan.stage, loss=loss, lr=plan.optimizer.param_groups[0]["lr"], lr_mult=lr_mult,
                           supervised_tokens=supervised, tokens=positions, tok_per_s=tok_per_s, mfu=mfu,
                           elapsed=elapsed, eta_s=elapsed / (step - first_step) * (plan.total_steps - step),
                           **plan.step_metrics())
                bar.set_postfix(rates_postfix(loss, tok_per_s, mfu))
                bar.update()
                done = step == plan.total_steps
                if done or (plan.eval_every and step % plan.eval_every == 0):
                    evaluation = plan.evaluate(step)
                    logger.log(step, stage=plan.stage, **evaluation)
                if done or (plan.save_every and step % plan.save_every == 0):
                    meta = {"stage": plan.stage, "final": done, "config": plan.config, "total_steps": plan.total_steps,
                            **plan.meta, **{k: v for k, v in evaluation.items() if isinstance(v, (int, float))}}
                    save_checkpoint(out, step, plan.model, meta, plan.optimizer, plan.keep_last,
                                    rank_state={"data": plan.batches.state_dict()})
        bar.close()
        conclusion = plan.conclude(step)
        if conclusion:
            logger.log(step, stage=plan.stage, **conclusion)
    finally:
        bar.close()
        logger.close()
        plan.batches.close()
    return StageResult(step, time.time() - started, evaluation, conclusion)
