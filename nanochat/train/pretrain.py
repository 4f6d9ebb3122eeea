"""`nanochat pretrain`: base pretraining of a GPT on a text corpus.

One process or `torchrun --nproc_per_node=N` (multi-node through torchrun's rendezvous flags);
the same code either way. Every step goes to the progress bar and `metrics.jsonl`; every
`--eval-every` steps the validation bits-per-byte and greedy samples; every `--save-every` steps
(and at the end) a checkpoint from which `--resume` continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanochat.config import PRESETS, TrainConfig, parse_config, run_dir, tokenizer_dir
from nanochat.data.loader import DataLoader
from nanochat.data.sources import resolve_source
from nanochat.errors import NanochatError
from nanochat.evaluate.bpb import evaluate_bpb, token_byte_lengths
from nanochat.gpt import GPT, GPTConfig
from nanochat.metrics import MetricsLogger, progress
from nanochat.optim import apply_schedule, build_optimizer
from nanochat.runtime import Runtime, init_runtime, print0, teardown
from nanochat.tokenizer import Tokenizer
from nanochat.train.loop import grad_accum_steps, rates_postfix, step_rates, train_step

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "La capital de España es",
    "The opposite of hot is",
    "Le plus grand océan du monde est",
]


def load_tokenizer(name: str) -> Tokenizer:
    directory = tokenizer_dir(name)
    if not directory.is_dir():
        hint = "--preset tiny" if name == "tiny" else f"--name {name}"
        raise NanochatError(f"no tokenizer '{name}' in {directory}; train it first with "
                            f"`nanochat tokenizer train {hint}`")
    return Tokenizer.load(directory)


def tokenizer_identity(name: str, tok: Tokenizer) -> dict:
    """What a checkpoint records of its tokenizer: name, size and a hash of its files."""
    h = hashlib.sha256()
    for f in sorted(tokenizer_dir(name).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return {"name": name, "vocab_size": tok.vocab_size, "sha256": h.hexdigest()}


def greedy_samples(model: GPT, tok: Tokenizer, prompts: list[str], rt: Runtime, max_tokens: int = 16) -> list[str]:
    """Greedy continuations of text prompts (after BOS), as prompt + continuation."""
    from nanochat.engine import Engine

    outs = Engine(model, tok, rt).complete([[tok.bos_id, *tok.encode(p)] for p in prompts], max_tokens=max_tokens)
    return [p + tok.decode(o) for p, o in zip(prompts, outs, strict=True)]


def _resume_keys(cfg: TrainConfig) -> dict:
    """Settings a resumed run must share with its checkpoint (others, e.g. eval cadence, may change)."""
    d = dataclasses.asdict(cfg)
    return {k: d[k] for k in ("model", "tokenizer", "data", "total_batch_tokens")}


def pretrain(cfg: TrainConfig, rt: Runtime) -> dict:
    """Train (or resume) the run `cfg.run`; returns a summary of the finished run."""
    tok = load_tokenizer(cfg.tokenizer)
    source = resolve_source(cfg.data, cfg.text_field, cfg.skip_bad_data)
    T = cfg.model.sequence_len
    accum = grad_accum_steps(cfg.total_batch_tokens, cfg.micro_batch, T, rt.world_size)
    run = run_dir(cfg.run)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with rt.device:
        model = GPT(GPTConfig.from_model_config(cfg.model, tok.vocab_size))
    n_params = model.num_params()
    flops_per_token = model.flops_per_token()
    total_steps = cfg.max_steps or max(1, round(cfg.tokens_per_param * n_params / cfg.total_batch_tokens))
    optimizer = build_optimizer(model, cfg.optim, cfg.total_batch_tokens)
    loader = DataLoader(source, tok, cfg.micro_batch, T, "train", rt.device, rt.rank, rt.world_size, seed=cfg.seed)

    step = 0
    previous = latest_checkpoint(run)
    if cfg.resume:
        if previous is None:
            raise NanochatError(f"--resume: run '{cfg.run}' has no checkpoint in {run}; start it without --resume")
        meta = load_checkpoint(previous, model, optimizer, expected_config=_resume_keys(cfg), restore_rng=True)
        if meta.get("stage") != "pretrain":
            raise NanochatError(f"{previous} is a {meta.get('stage')!r} checkpoint, not a pretraining one")
        loader.load_state_dict(meta["rank_state"]["loader"])
        step = meta["step"]
        print0(f"resumed {cfg.run} from {previous} (step {step} of {total_steps})")
    elif previous is not None:
        raise NanochatError(f"run '{cfg.run}' already has checkpoints (latest {previous.name}) in {run}; "
                            "pass --resume to continue it, or choose another --run")

    train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.distributed else model
    if cfg.compile:
        train_model = torch.compile(train_model)
    token_bytes = token_byte_lengths(tok, rt.device)
    identity = tokenizer_identity(cfg.tokenizer, tok)
    config = dataclasses.asdict(cfg)
    print0(f"pretrain {cfg.run}: {n_params / 1e6:.2f}M parameters, {total_steps} steps of {cfg.total_batch_tokens:,} "
           f"tokens ({accum} micro-batch(es) of {cfg.micro_batch}×{T} on each of {rt.world_size} rank(s)), "
           f"{rt.device}, {rt.autocast_dtype or torch.float32}")

    val_bpb = None

    def evaluate() -> None:
        nonlocal val_bpb
        val = DataLoader(source, tok, cfg.micro_batch, T, "val", rt.device, rt.rank, rt.world_size)
        val_bpb = evaluate_bpb(model, val, token_bytes, rt, max_batches=max(1, cfg.eval_tokens // (cfg.micro_batch * T
                                                                                         * rt.world_size)))
        val.close()
        samples = greedy_samples(model, tok, SAMPLE_PROMPTS, rt) if rt.master else []
        logger.log(step, stage="pretrain", val_bpb=val_bpb, samples=samples)
        progress_bar.write(f"step {step}: val bpb {val_bpb:.4f}")
        for s in samples:
            progress_bar.write(f"  {s!r}")

    def save(final: bool) -> Path:
        meta = {"stage": "pretrain", "final": final, "config": config, "tokenizer": identity, "val_bpb": val_bpb,
                "total_steps": total_steps}
        return save_checkpoint(run, step, model, meta, optimizer, cfg.keep_last,
                               rank_state={"loader": loader.state_dict()})

    logger = MetricsLogger(run / "metrics.jsonl", config=config, run_name=cfg.run)
    progress_bar = progress(total=total_steps, initial=step, desc="pretrain", unit="step")
    started = time.time()
    first_step = step
    try:
        while step < total_steps:
            lr_mult = apply_schedule(optimizer, step, total_steps, cfg.optim)
            t0 = time.perf_counter()
            loss, _ = train_step(train_model, optimizer, loader, accum, rt)
            rt.sync()
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                last = latest_checkpoint(run)
                raise NanochatError(
                    f"the loss became {loss} at step {step + 1}: training diverged. "
                    + (f"The last good checkpoint is {last}; " if last else "No checkpoint was written yet; ")
                    + "lower the learning rates (--optim.matrix-lr, --optim.embedding-lr …) and start again")
            step += 1
            tok_per_s, mfu = step_rates(cfg.total_batch_tokens, dt, flops_per_token, rt)
            elapsed = time.time() - started
            logger.log(step, stage="pretrain", loss=loss, lr=optimizer.param_groups[0]["lr"], lr_mult=lr_mult,
                       tok_per_s=tok_per_s, mfu=mfu, cropped=loader.cropped_fraction, elapsed=elapsed,
                       eta_s=elapsed / (step - first_step) * (total_steps - step))
            progress_bar.set_postfix(rates_postfix(loss, tok_per_s, mfu))
            progress_bar.update()
            done = step == total_steps
            if done or (cfg.eval_every and step % cfg.eval_every == 0):
                evaluate()
            if done or (cfg.save_every and step % cfg.save_every == 0):
                save(final=done)
    finally:
        progress_bar.close()
        logger.close()
        loader.close()
    return {"run": cfg.run, "steps": total_steps, "params": n_params, "val_bpb": val_bpb,
            "seconds": time.time() - started}


def cli(argv: list[str]) -> int:
    cfg = parse_config(TrainConfig, argv, presets=PRESETS, prog="nanochat pretrain",
                       description="Pretrain a GPT on a text corpus.")
    rt = init_runtime(cfg.device, cfg.dtype, seed=cfg.seed)
    try:
        summary = pretrain(cfg, rt)
    finally:
        teardown()
    print0(f"done: {summary['steps']} steps, val bpb {summary['val_bpb']:.4f}, {summary['seconds']:.0f} s; "
           f"checkpoints in {run_dir(cfg.run) / 'checkpoints'}")
    return 0
