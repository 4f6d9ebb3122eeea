"""`nanochat midtrain` and `nanochat sft`: from autocomplete to a chat model that knows when to stop.

Both continue a run's model on conversations rendered in the chat format (loss only on what the
assistant writes), through the same stage loop as pretraining (`train/loop.py`: accumulation,
the sharded optimizer under torchrun, the supervised-token normalisation that keeps an all-masked
micro-batch at zero loss, checkpoints, resume, metrics). What differs lives here: the starting
model, the task mixture and its batches (`data/chat.py`), and the evaluation (`evaluate/probes.py`).

  midtrain  base checkpoint -> runs/<run>/mid. Conversations are concatenated into one token
            stream and cut into full rows: every token of every row is used, and the model
            sees the special tokens in many positions.
  sft       mid checkpoint (or base, if there is no mid) -> runs/<run>/sft. One conversation
            per row, padded to the longest in the batch, as at inference time.

At the end of each stage: greedy chats from fixed prompts into the log, the share of held-out
prompts answered with a closing <|assistant_end|>, and how well (bits per byte) the model
predicts reference answers to held-out Wikipedia questions, next to the base model's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nanochat.config import MIDTRAIN_PRESETS, SFT_PRESETS, ChatConfig, OptimConfig, parse_config
from nanochat.data.chat import ChatBatches, render_conversations
from nanochat.errors import NanochatError
from nanochat.evaluate.probes import answer_bpb, assistant_end_rate, held_out_probes, sample_chats, validation_loss
from nanochat.gpt import GPT
from nanochat.metrics import write0
from nanochat.optim import build_optimizer
from nanochat.runs import get_stage, latest, load_stage_model
from nanochat.runtime import Runtime, init_runtime, teardown
from nanochat.tasks import OFFLINE_MIDTRAIN, OFFLINE_SFT, build_mixture
from nanochat.tokenizer import Tokenizer
from nanochat.train.loop import StagePlan, train_stage

LR_FIELDS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "adamw_matrix_lr")


def scaled_optim(optim: OptimConfig, scale: float) -> OptimConfig:
    """`optim` with every learning rate multiplied by `scale` (--lr-scale)."""
    return dataclasses.replace(optim, **{k: getattr(optim, k) * scale for k in LR_FIELDS})


class ChatEval:
    """The chat stages' evaluation: held-out loss during training; at the end, the probes."""

    def __init__(self, stage: str, cfg: ChatConfig, model: GPT, tok: Tokenizer, val: list[np.ndarray],
                 rt: Runtime, base: GPT):
        self.stage, self.cfg, self.model, self.tok, self.val, self.rt = stage, cfg, model, tok, val, rt
        self.questions, self.items = held_out_probes()
        # The yardstick: how the base model predicts the same held-out answers, measured before any step.
        self.answer_bpb_base = answer_bpb(base, tok, self.items, rt) if rt.master else None

    def evaluate(self, step: int) -> dict:
        rt, T = self.rt, self.model.config.sequence_len
        val = ChatBatches(self.val, self.cfg.micro_batch, T, self.stage == "mid", rt.device, rt.rank, rt.world_size)
        return {"val_loss": validation_loss(self.model, val, rt)}

    def conclude(self, step: int) -> dict:
        if not self.rt.master:
            return {}
        model, tok, rt = self.model, self.tok, self.rt
        results = {"assistant_end_rate": assistant_end_rate(model, tok, self.questions, rt),
                   "answer_bpb": answer_bpb(model, tok, self.items, rt), "answer_bpb_base": self.answer_bpb_base,
                   "samples": sample_chats(model, tok, rt)}
        for s in results["samples"]:
            write0(f"  user: {s['user']}\n  assistant: {s['assistant']}")
        return results


def train_chat(stage: str, cfg: ChatConfig, rt: Runtime) -> dict:
    """Run `stage` ("mid" or "sft") of run `cfg.run`; returns a summary."""
    start_from = next((s for s in get_stage(stage).starts_from if latest(cfg.run, s)), None)
    if start_from is None:
        raise NanochatError(f"run '{cfg.run}' has no checkpoint to start {stage} from; pretrain it first "
                            f"(`nanochat pretrain --run {cfg.run}` or the speedrun)")
    model, tok, base_meta = load_stage_model(cfg.run, start_from, rt)
    T = model.config.sequence_len
    spec = cfg.tasks or (OFFLINE_MIDTRAIN if stage == "mid" else OFFLINE_SFT)
    packed = stage == "mid"
    train_convs = render_conversations(build_mixture(spec, "train", cfg.seed, cfg.epochs), tok, T + 1)
    val_convs = render_conversations(build_mixture(spec, "val", cfg.seed, 1), tok, T + 1)
    per_step = cfg.micro_batch * rt.world_size
    if cfg.batch_size % per_step:
        raise NanochatError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch × ranks = {per_step}")
    accum = cfg.batch_size // per_step
    batches = ChatBatches(train_convs, cfg.micro_batch, T, packed, rt.device, rt.rank, rt.world_size)
    total_steps = cfg.max_steps or len(batches) // accum
    if total_steps < 1 or len(batches) < total_steps * accum:
        raise NanochatError(f"the mixture {spec!r} gives {len(batches)} micro-batches, fewer than the "
                            f"{max(total_steps, 1) * accum} that {max(total_steps, 1)} steps need; add --epochs")
    optim = scaled_optim(cfg.optim, cfg.lr_scale)
    optimizer = build_optimizer(model, optim, cfg.batch_size * T)
    base = model if start_from == "base" or not rt.master else load_stage_model(cfg.run, "base", rt)[0]
    probes = ChatEval(stage, cfg, model, tok, val_convs, rt, base)
    summary: dict = {"stage": stage, "run": cfg.run, "start_from": start_from, "steps": total_steps,
                     "train_conversations": len(train_convs)}
    config = {**dataclasses.asdict(cfg), "model": base_meta["config"]["model"]}
    plan = StagePlan(
        stage=stage, run=cfg.run, model=model, optimizer=optimizer, optim=optim, batches=batches, accum=accum,
        total_steps=total_steps, config=config, resume_keys={"tasks": cfg.tasks, "run": cfg.run},
        meta={"tokenizer": base_meta["tokenizer"], "start_from": start_from}, resume=cfg.resume,
        compile=cfg.compile, varying_width=not packed, eval_every=cfg.eval_every, save_every=cfg.save_every,
        keep_last=cfg.keep_last, evaluate=probes.evaluate, conclude=probes.conclude)
    write0(f"{stage} {cfg.run} from {start_from}: {len(train_convs):,} conversations ({spec}), {total_steps} steps "
           f"of {cfg.batch_size} {'rows' if packed else 'conversations'}")
    result = train_stage(plan, rt)
    summary.update(seconds=result.seconds, **result.evaluation,
                   **{k: v for k, v in result.conclusion.items() if k != "samples"})
    if rt.master:
        write0(f"{stage}: val loss {summary.get('val_loss', float('nan')):.4f}, closes its turn on "
               f"{summary['assistant_end_rate']:.0%} of {len(probes.questions)} held-out prompts, held-out answer "
               f"bpb {summary['answer_bpb']:.3f} (base model: {summary['answer_bpb_base']:.3f})")
    return summary


def _cli(stage: str, argv: list[str]) -> int:
    presets = MIDTRAIN_PRESETS if stage == "mid" else SFT_PRESETS
    cfg = parse_config(ChatConfig, argv, presets=presets, prog=f"nanochat {get_stage(stage).command}",
                       description=__doc__.split("\n\n")[0])
    rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype, seed=cfg.seed)
    try:
        train_chat(stage, cfg, rt)
    finally:
        teardown()
    return 0


def midtrain_cli(argv: list[str]) -> int:
    return _cli("mid", argv)


def sft_cli(argv: list[str]) -> int:
    return _cli("sft", argv)
