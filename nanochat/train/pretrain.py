"""`nanochat pretrain`: base pretraining of a GPT on a text corpus.

One process or `torchrun --nproc_per_node=N` (multi-node through torchrun's rendezvous flags);
the same code either way. What is particular to pretraining lives here: the model drawn from the
seed, the streaming loader over the corpus, and the evaluation (validation bits per byte and
greedy samples every `--eval-every` steps). The loop itself — resume, progress, metrics,
checkpoints every `--save-every` steps and at the end — is `train/loop.py`'s, shared with the
chat stages.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from nanochat.config import PRESETS, TrainConfig, parse_config
from nanochat.data.loader import DataLoader
from nanochat.data.sources import DataSource, resolve_source
from nanochat.errors import NanochatError
from nanochat.evaluate.bpb import evaluate_bpb, token_byte_lengths
from nanochat.evaluate.probes import SAMPLE_PROMPTS, greedy_samples
from nanochat.gpt import GPT
from nanochat.memory import GIB, choose_micro_batch, estimate, out_of_memory_message
from nanochat.metrics import write0
from nanochat.optim import build_optimizer
from nanochat.runs import load_tokenizer, stage_dir, tokenizer_identity
from nanochat.runtime import Runtime, device_memory, init_runtime, print0, teardown
from nanochat.tokenizer import Tokenizer
from nanochat.train.loop import StagePlan, grad_accum_steps, train_stage


def _resume_keys(cfg: TrainConfig) -> dict:
    """Settings a resumed run must share with its checkpoint (others, e.g. eval cadence, may change)."""
    d = dataclasses.asdict(cfg)
    return {k: d[k] for k in ("model", "tokenizer", "data", "total_batch_tokens")}


class PretrainEval:
    """Validation bits per byte on `eval_tokens` of the held-out split, and greedy samples."""

    def __init__(self, cfg: TrainConfig, model: GPT, tok: Tokenizer, source: DataSource, rt: Runtime):
        self.cfg, self.model, self.tok, self.source, self.rt = cfg, model, tok, source, rt
        self.token_bytes = token_byte_lengths(tok, rt.device)

    def __call__(self, step: int) -> dict:
        cfg, rt, T = self.cfg, self.rt, self.cfg.model.sequence_len
        val = DataLoader(self.source, self.tok, cfg.micro_batch, T, "val", rt.device, rt.rank, rt.world_size)
        try:
            bpb = evaluate_bpb(self.model, val, self.token_bytes, rt,
                               max_batches=max(1, cfg.eval_tokens // (cfg.micro_batch * T * rt.world_size)))
        finally:
            val.close()
        samples = greedy_samples(self.model, self.tok, SAMPLE_PROMPTS, rt) if rt.master else []
        write0(f"step {step}: val bpb {bpb:.4f}" + "".join(f"\n  {s!r}" for s in samples))
        return {"val_bpb": bpb, "samples": samples}


def _least_memory(rt: Runtime) -> int | None:
    """This device's usable memory, or under torchrun the least of all ranks': every rank must pick
    the same micro-batch, or their gradient accumulations would not line up."""
    available = device_memory(rt.device)
    if not rt.distributed or available is None:
        return available
    least = torch.tensor([float(available)], dtype=torch.float64, device=rt.device)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return int(least.item())


def pretrain(cfg: TrainConfig, rt: Runtime) -> dict:
    """Train (or resume) the run `cfg.run`; returns a summary of the finished run."""
    tok = load_tokenizer(cfg.tokenizer)
    source = resolve_source(cfg.data, cfg.text_field, cfg.skip_bad_data)
    T = cfg.model.sequence_len
    bf16, where = rt.autocast_dtype is torch.bfloat16, str(rt.device)
    micro = choose_micro_batch(cfg, tok.vocab_size, rt.world_size, bf16, _least_memory(rt), where)
    if cfg.micro_batch == "auto":
        peak = estimate(cfg.model, tok.vocab_size, micro, bf16, rt.world_size, compiled=cfg.compile).total
        print0(f"--micro-batch auto: {micro} (estimated peak {peak / GIB:.1f} GiB per rank on {where})")
    cfg = dataclasses.replace(cfg, micro_batch=micro)
    accum = grad_accum_steps(cfg.total_batch_tokens, cfg.micro_batch, T, rt.world_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with rt.device:
        model = GPT(cfg.model, tok.vocab_size)
    n_params = model.num_params()
    total_steps = cfg.max_steps or max(1, round(cfg.tokens_per_param * n_params / cfg.total_batch_tokens))
    optimizer = build_optimizer(model, cfg.optim, cfg.total_batch_tokens)
    loader = DataLoader(source, tok, cfg.micro_batch, T, "train", rt.device, rt.rank, rt.world_size, seed=cfg.seed)
    plan = StagePlan(
        stage="base", run=cfg.run, model=model, optimizer=optimizer, optim=cfg.optim, batches=loader, accum=accum,
        total_steps=total_steps, config=dataclasses.asdict(cfg), resume_keys=_resume_keys(cfg),
        meta={"tokenizer": tokenizer_identity(cfg.tokenizer, tok)}, resume=cfg.resume, compile=cfg.compile,
        eval_every=cfg.eval_every, save_every=cfg.save_every, keep_last=cfg.keep_last,
        evaluate=PretrainEval(cfg, model, tok, source, rt),
        step_metrics=lambda: {"cropped": loader.cropped_fraction})
    print0(f"pretrain {cfg.run}: {n_params / 1e6:.2f}M parameters, {total_steps} steps of {cfg.total_batch_tokens:,} "
           f"tokens ({accum} micro-batch(es) of {cfg.micro_batch}×{T} on each of {rt.world_size} rank(s)), "
           f"{rt.device}, {rt.autocast_dtype or torch.float32}")
    try:
        result = train_stage(plan, rt)
    except torch.OutOfMemoryError as e:
        raise NanochatError(out_of_memory_message(cfg, tok.vocab_size, rt.world_size, bf16, where)) from e
    return {"run": cfg.run, "steps": total_steps, "params": n_params, "val_bpb": result.evaluation.get("val_bpb"),
            "seconds": result.seconds}


def cli(argv: list[str]) -> int:
    cfg = parse_config(TrainConfig, argv, presets=PRESETS, prog="nanochat pretrain",
                       description="Pretrain a GPT on a text corpus.")
    rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype, seed=cfg.seed)
    try:
        summary = pretrain(cfg, rt)
    finally:
        teardown()
    bpb = "" if summary["val_bpb"] is None else f", val bpb {summary['val_bpb']:.4f}"
    print0(f"done: {summary['steps']} steps{bpb}, {summary['seconds']:.0f} s; checkpoints in "
           f"{stage_dir(cfg.run, 'base') / 'checkpoints'}")
    return 0
