"""`nanochat midtrain` and `nanochat sft`: from autocomplete to a chat model that knows when to stop.

Both continue a run's model on conversations rendered with the chat format (loss only on what
the assistant writes) and share everything with pretraining but the batches: the same optimizer,
`train_step` (accumulation, DDP, the supervised-token normalisation that keeps an all-masked
micro-batch at zero loss), checkpoints, resume and metrics.

  midtrain  base checkpoint -> runs/<run>/mid. Conversations are concatenated into one token
            stream and cut into full rows: every token of every row is used, and the model
            sees the special tokens in many positions.
  sft       mid checkpoint (or base, if there is no mid) -> runs/<run>/sft. One conversation
            per row, padded to the longest in the batch, as at inference time.

At the end of each stage: greedy chats from fixed prompts into the log, the share of held-out
prompts answered with a closing <|assistant_end|>, and how well (bits per byte) the model
predicts reference answers to held-out Wikipedia questions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from nanochat.config import MIDTRAIN_PRESETS, SFT_PRESETS, ChatConfig, ModelConfig, parse_config, run_dir
from nanochat.errors import NanochatError
from nanochat.gpt import GPT, GPTConfig
from nanochat.metrics import MetricsLogger, progress
from nanochat.optim import apply_schedule, build_optimizer
from nanochat.runtime import Runtime, init_runtime, print0, teardown
from nanochat.tokenizer import Tokenizer
from nanochat.train.loop import rates_postfix, step_rates, train_step
from nanochat.train.pretrain import load_tokenizer, tokenizer_identity

# stage -> (the stage it starts from, in order of preference)
STARTS_FROM = {"mid": ("base",), "sft": ("mid", "base")}
SAMPLE_CHATS = [
    "Hello! Who are you?",
    "What can you do?",
    "What is the capital of France?",
    "How many r are in the word strawberry?",
    "What is 23 times 17?",
]


def stage_dir(run: str, stage: str) -> Path:
    """Where a stage keeps its checkpoints: the run itself for base, a subfolder otherwise."""
    return run_dir(run) if stage == "base" else run_dir(run) / stage


def load_stage_model(run: str, stage: str, rt: Runtime) -> tuple[GPT, Tokenizer, dict]:
    """The final model of `stage` ("base", "mid", "sft") of a run, with its tokenizer."""
    path = latest_checkpoint(stage_dir(run, stage))
    if path is None:
        command = {"base": "nanochat pretrain", "mid": "nanochat midtrain", "sft": "nanochat sft"}[stage]
        raise NanochatError(f"run '{run}' has no {stage} checkpoint in {stage_dir(run, stage)}; make it with "
                            f"`{command} --run {run}`")
    return load_model(path, rt)


def load_model(path: Path, rt: Runtime) -> tuple[GPT, Tokenizer, dict]:
    """The model saved in checkpoint directory `path`, verified, with the tokenizer it was trained with."""
    meta = read_meta(path)
    tok = load_tokenizer(meta["tokenizer"]["name"])
    if tokenizer_identity(meta["tokenizer"]["name"], tok)["sha256"] != meta["tokenizer"]["sha256"]:
        raise NanochatError(f"tokenizer '{meta['tokenizer']['name']}' changed since {path} was trained; "
                            "retrain the model or restore that tokenizer")
    with rt.device:
        model = GPT(GPTConfig.from_model_config(ModelConfig(**meta["config"]["model"]), tok.vocab_size))
    load_checkpoint(path, model, verify=False)
    return model, tok, meta


def _render(task, tok: Tokenizer, max_tokens: int) -> list[np.ndarray]:
    """Every conversation of a task as a (2, n) array: token ids, and 1 where the assistant writes."""
    out = []
    for i in range(len(task)):
        ids, mask = tok.render_conversation(task[i]["messages"], max_tokens=max_tokens)
        out.append(np.array([ids, mask], dtype=np.int64))
    return out


class ChatBatches:
    """Deterministic (x, y) batches of rendered conversations for one rank; y is -1 where the
    assistant does not write (and on padding). `packed`: conversations concatenated and cut into
    full rows (midtraining); else one conversation per row, padded (SFT). Global row i goes to
    rank i % world_size, so the step's rows do not depend on the number of ranks."""

    def __init__(self, conversations: list[np.ndarray], batch_size: int, seq_len: int, packed: bool,
                 device: torch.device, rank: int = 0, world_size: int = 1):
        self.batch_size, self.device, self.rank, self.world_size = batch_size, device, rank, world_size
        if packed:
            stream = np.concatenate(conversations, axis=1)
            n_rows = stream.shape[1] // (seq_len + 1)
            self.rows = [stream[:, i * (seq_len + 1):(i + 1) * (seq_len + 1)] for i in range(n_rows)]
        else:
            self.rows = conversations
        self.next_row = 0
        self.positions = 0  # token positions of every batch handed out so far (padding included)

    def __len__(self) -> int:
        """Whole batches left in one pass, for this rank."""
        return (len(self.rows) - self.next_row) // (self.batch_size * self.world_size)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self) == 0:
            raise StopIteration
        start = self.next_row + self.rank
        mine = self.rows[start:start + self.batch_size * self.world_size:self.world_size]
        self.next_row += self.batch_size * self.world_size
        width = max(r.shape[1] for r in mine)
        ids = np.zeros((len(mine), width), dtype=np.int64)
        learn = np.zeros((len(mine), width), dtype=bool)
        for b, row in enumerate(mine):
            ids[b, :row.shape[1]] = row[0]
            learn[b, :row.shape[1]] = row[1] == 1
        x = torch.from_numpy(ids[:, :-1])
        self.positions += x.numel()
        y = torch.from_numpy(np.where(learn[:, 1:], ids[:, 1:], -1))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"next_row": self.next_row}

    def load_state_dict(self, state: dict) -> None:
        self.next_row = state["next_row"]


@torch.no_grad()
def validation_loss(model: GPT, batches: ChatBatches, rt: Runtime, max_batches: int = 16) -> float:
    """Mean loss per supervised token on held-out conversations."""
    total = count = 0.0
    was_training = model.training
    model.eval()
    for i, (x, y) in enumerate(batches):
        if i == max_batches:
            break
        with rt.autocast():
            total += model(x, y, loss_reduction="sum").item()
        count += (y != -1).sum().item()
    model.train(was_training)
    return total / max(count, 1)


def chat_replies(model: GPT, tok: Tokenizer, questions: list[str], rt: Runtime, max_new_tokens: int = 128,
                 temperature: float = 0.0, batch: int = 20) -> list[list[int]]:
    """Replies (token ids, ending with <|assistant_end|> when the model closed its turn), tool calls
    executed; greedy, or sampled from the top 50 tokens at `temperature` with a fixed seed."""
    from nanochat.engine import Engine

    engine = Engine(model, tok, rt)
    prompts = [tok.render_for_completion([{"role": "user", "content": q}]) for q in questions]
    out = []
    for i in range(0, len(prompts), batch):
        out += engine.complete(prompts[i:i + batch], max_tokens=max_new_tokens, temperature=temperature, top_k=50,
                               seed=i)
    return out


def assistant_end_rate(model: GPT, tok: Tokenizer, questions: list[str], rt: Runtime) -> float:
    """Share of replies closed with <|assistant_end|> within 128 tokens, sampled as a chat would be
    (temperature 0.7, top 50): greedy decoding of a small model loops on a phrase, which measures
    the decoding rule rather than whether the model learned to end its turn."""
    end = tok.special_id("<|assistant_end|>")
    replies = chat_replies(model, tok, questions, rt, temperature=0.7)
    return sum(bool(r) and r[-1] == end for r in replies) / len(replies)


@torch.no_grad()
def answer_bpb(model: GPT, tok: Tokenizer, items: list[tuple[str, str]], rt: Runtime) -> float:
    """Bits per byte of reference answers given their questions, in the chat format."""
    nats = n_bytes = 0.0
    was_training = model.training
    model.eval()
    for question, answer in items:
        ids, mask = tok.render_conversation([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}])
        x = torch.tensor([ids[:-1]], device=rt.device)
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]], device=rt.device)
        y[0, -1] = -1  # <|assistant_end|> is not part of the answer's bytes
        with rt.autocast():
            nats += model(x, y, loss_reduction="sum").item()
        n_bytes += len(answer.encode())
    model.train(was_training)
    return nats / (math.log(2) * n_bytes)


def held_out_probes(n: int = 100, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """Held-out Wikipedia questions (from articles outside pretraining's train split) with answers."""
    from nanochat.tasks.wiki import wiki_eval_items

    items = wiki_eval_items(n, seed)
    return [q for q, _ in items], items


def train_chat(stage: str, cfg: ChatConfig, rt: Runtime) -> dict:
    """Run `stage` ("mid" or "sft") of run `cfg.run`; returns a summary."""
    from nanochat.tasks import OFFLINE_MIDTRAIN, OFFLINE_SFT, build_mixture

    out_dir = stage_dir(cfg.run, stage)
    start_from = next((s for s in STARTS_FROM[stage] if latest_checkpoint(stage_dir(cfg.run, s))), None)
    if start_from is None:
        raise NanochatError(f"run '{cfg.run}' has no checkpoint to start {stage} from; pretrain it first "
                            f"(`nanochat pretrain --run {cfg.run}` or the speedrun)")
    model, tok, base_meta = load_stage_model(cfg.run, start_from, rt)
    T = model.config.sequence_len
    spec = cfg.tasks or (OFFLINE_MIDTRAIN if stage == "mid" else OFFLINE_SFT)
    packed = stage == "mid"
    train_convs = _render(build_mixture(spec, "train", cfg.seed, cfg.epochs), tok, T + 1)
    val_convs = _render(build_mixture(spec, "val", cfg.seed, 1), tok, T + 1)
    per_step = cfg.micro_batch * rt.world_size
    if cfg.batch_size % per_step:
        raise NanochatError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch × ranks = {per_step}")
    accum = cfg.batch_size // per_step
    batches = ChatBatches(train_convs, cfg.micro_batch, T, packed, rt.device, rt.rank, rt.world_size)
    total_steps = cfg.max_steps or len(batches) // accum
    if total_steps < 1 or len(batches) < total_steps * accum:
        raise NanochatError(f"the mixture {spec!r} gives {len(batches)} micro-batches, fewer than the "
                            f"{max(total_steps, 1) * accum} that {max(total_steps, 1)} steps need; add --epochs")
    optim_cfg = dataclasses.replace(cfg.optim, **{k: getattr(cfg.optim, k) * cfg.lr_scale for k in
                                                   ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr",
                                                    "adamw_matrix_lr")})
    optimizer = build_optimizer(model, optim_cfg, cfg.batch_size * T)
    flops_per_token = model.flops_per_token()

    step = 0
    previous = latest_checkpoint(out_dir)
    if cfg.resume and previous is not None:
        meta = load_checkpoint(previous, model, optimizer, expected_config={"tasks": cfg.tasks, "run": cfg.run},
                               restore_rng=True)
        batches.load_state_dict(meta["rank_state"]["batches"])
        step = meta["step"]
        print0(f"resumed {stage} of {cfg.run} from {previous} (step {step} of {total_steps})")
    elif previous is not None:
        raise NanochatError(f"run '{cfg.run}' already has {stage} checkpoints in {out_dir}; pass --resume to "
                            "continue, or delete them to start over")

    train_model = DDP(model) if rt.distributed else model
    if cfg.compile:
        train_model = torch.compile(train_model)
    config = dataclasses.asdict(cfg)
    config["model"] = base_meta["config"]["model"]
    logger = MetricsLogger(run_dir(cfg.run) / "metrics.jsonl", config=config, run_name=cfg.run)
    questions, probe_items = held_out_probes()
    summary: dict = {"stage": stage, "run": cfg.run, "start_from": start_from, "steps": total_steps,
                     "train_conversations": len(train_convs)}
    if rt.master:  # the yardstick: how the base model predicts the same held-out answers
        base = model if start_from == "base" else load_stage_model(cfg.run, "base", rt)[0]
        summary["answer_bpb_base"] = answer_bpb(base, tok, probe_items, rt)
    print0(f"{stage} {cfg.run} from {start_from}: {len(train_convs):,} conversations ({spec}), {total_steps} steps "
           f"of {cfg.batch_size} {'rows' if packed else 'conversations'}")

    bar = progress(total=total_steps, initial=step, desc=stage, unit="step")
    started = time.time()
    try:
        while step < total_steps:
            lr_mult = apply_schedule(optimizer, step, total_steps, optim_cfg)
            t0, handed_out = time.perf_counter(), batches.positions
            loss, n_tokens = train_step(train_model, optimizer, batches, accum, rt)
            rt.sync()
            # Every position of every row goes through the model, an SFT row's padding too (this
            # rank's count × ranks: the other ranks' rows are as wide, up to their own padding).
            positions = (batches.positions - handed_out) * rt.world_size
            tok_per_s, mfu = step_rates(positions, time.perf_counter() - t0, flops_per_token, rt)
            if not math.isfinite(loss):
                raise NanochatError(f"the {stage} loss became {loss} at step {step + 1}; lower --lr-scale")
            step += 1
            logger.log(step, stage=stage, loss=loss, lr_mult=lr_mult, supervised_tokens=n_tokens,
                       tokens=positions, tok_per_s=tok_per_s, mfu=mfu, elapsed=time.time() - started)
            bar.set_postfix(rates_postfix(loss, tok_per_s, mfu))
            bar.update()
            done = step == total_steps
            if done or (cfg.eval_every and step % cfg.eval_every == 0):
                val = ChatBatches(val_convs, cfg.micro_batch, T, packed, rt.device, rt.rank, rt.world_size)
                summary["val_loss"] = validation_loss(model, val, rt)
                logger.log(step, stage=stage, val_loss=summary["val_loss"])
            if done or (cfg.save_every and step % cfg.save_every == 0):
                meta = {"stage": stage, "final": done, "config": config, "tokenizer": base_meta["tokenizer"],
                        "start_from": start_from}
                save_checkpoint(out_dir, step, model, meta, optimizer, cfg.keep_last,
                                rank_state={"batches": batches.state_dict()})
    finally:
        bar.close()
    summary["seconds"] = time.time() - started
    if rt.master:
        summary["assistant_end_rate"] = assistant_end_rate(model, tok, questions, rt)
        summary["answer_bpb"] = answer_bpb(model, tok, probe_items, rt)
        samples = [{"user": q, "assistant": tok.decode(r)}
                   for q, r in zip(SAMPLE_CHATS, chat_replies(model, tok, SAMPLE_CHATS, rt), strict=True)]
        logger.log(step, stage=stage, samples=samples, **{k: v for k, v in summary.items()
                                                          if k in ("assistant_end_rate", "answer_bpb",
                                                                   "answer_bpb_base")})
        for s in samples:
            bar.write(f"  user: {s['user']}\n  assistant: {s['assistant']}")
        bar.write(f"{stage}: val loss {summary.get('val_loss', float('nan')):.4f}, closes its turn on "
                  f"{summary['assistant_end_rate']:.0%} of {len(questions)} held-out prompts, held-out answer "
                  f"bpb {summary['answer_bpb']:.3f}"
                  + f" (base model: {summary['answer_bpb_base']:.3f})")
    logger.close()
    return summary


def _cli(stage: str, argv: list[str]) -> int:
    name = {"mid": "midtrain", "sft": "sft"}[stage]
    presets = MIDTRAIN_PRESETS if stage == "mid" else SFT_PRESETS
    cfg = parse_config(ChatConfig, argv, presets=presets, prog=f"nanochat {name}",
                       description=__doc__.split("\n\n")[0])
    rt = init_runtime(cfg.device, cfg.dtype, seed=cfg.seed)
    try:
        train_chat(stage, cfg, rt)
    finally:
        teardown()
    return 0


def midtrain_cli(argv: list[str]) -> int:
    return _cli("mid", argv)


def sft_cli(argv: list[str]) -> int:
    return _cli("sft", argv)
