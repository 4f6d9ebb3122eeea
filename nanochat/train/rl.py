"""`nanochat rl`: reinforcement learning on verifiable rewards, continuing a run's SFT model into
runs/<run>/rl, through the same stage loop as the other stages (`train/loop.py`: checkpoints,
resume, metrics, the sharded optimizer under torchrun).

One step:
  prompts     `prompts_per_step` questions from the tasks' train splits (a fixed shuffled order,
              cycled); rank r samples for every W-th of them.
  rollouts    `samples` completions of each question from the KV-cache engine (temperature, top-k,
              a token budget), the calculator live exactly as in chat: its results are forced
              into the reply. Every completion has its own random stream, seeded by (seed, step,
              question, sample), so what it says does not depend on batching or the number of ranks
              (`evaluate/passk.py`, which also measures the held-out pass@k before and after).
  rewards     the task's verifiable reward (tasks/rewards.py): 1 for the right final answer in
              a finished reply, else 0.
  advantages  reward − the mean reward of its question's group; with --normalise-advantages
              also divided by the group's standard deviation (GRPO's choice).
  update      one gradient step on −Σ advantage · log p(token) over the tokens the model
              sampled (never the prompt, never a forced tool output), divided by the number of
              those tokens in the whole step over every rank. It is `train_step`'s loss with the
              advantages as per-position weights. Completions with advantage 0 add exactly
              nothing to the gradient, so they skip the forward and backward passes (but not
              the count of tokens): with few right answers, most groups score all zeros.

Left out, compared with PPO and GRPO:
  - No probability ratios and no clipping. Each batch of rollouts is used for exactly one update
    of the policy that sampled it, so the ratio π/π_old is 1 where the gradient is taken, and
    clipping would never engage.
  - No value network. The group's mean reward is the baseline: unbiased, and no second model to
    train.
  - No KL penalty towards the SFT model. It would need a frozen second copy of the weights and
    a forward pass through it. Short runs at small learning rates stay close to where they
    started, and the held-out pass@k before and after would show any drift.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.distributed as dist

from nanochat.config import RL_PRESETS, RLConfig, parse_config
from nanochat.engine import Engine
from nanochat.errors import NanochatError
from nanochat.evaluate.passk import PassAtK, Questions, Rollout, sample_completions, score
from nanochat.optim import build_optimizer
from nanochat.runs import get_stage, latest, load_stage_model
from nanochat.runtime import Runtime, init_runtime, print0, teardown
from nanochat.train.chat import scaled_optim
from nanochat.train.loop import StagePlan, train_stage


def group_advantages(rewards: torch.Tensor, normalise: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """(questions, samples) rewards -> advantages: each reward minus its row's mean, divided by the
    row's standard deviation with `normalise` (a row of equal rewards gets advantage 0 either way)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalise:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def rollout_rows(prompts: list[list[int]], rollouts: list[Rollout], advantages: list[float], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, weights) for a batch of completions: each row is prompt + completion, right-padded;
    y is the next token where the model chose it and -1 elsewhere (the prompt, forced tool
    outputs, padding); weights hold each row's advantage."""
    width = max(len(p) + len(t) for p, (t, _) in zip(prompts, rollouts, strict=True))
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    learn = np.zeros((len(prompts), width), dtype=bool)
    for b, (prompt, (tokens, chosen)) in enumerate(zip(prompts, rollouts, strict=True)):
        ids[b, :len(prompt) + len(tokens)] = prompt + tokens
        learn[b, len(prompt):len(prompt) + len(tokens)] = chosen
    x = torch.from_numpy(ids[:, :-1])
    y = torch.from_numpy(np.where(learn[:, 1:], ids[:, 1:], -1))
    weights = torch.tensor(advantages, dtype=torch.float32)[:, None].expand_as(x).contiguous()
    return x.to(device), y.to(device), weights.to(device)


def update_batches(prompts: list[list[int]], rollouts: list[Rollout], advantages: list[float], parts: int,
                   device: torch.device) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """A step's completions as `parts` micro-batches of (x, y, weights, count), and how many
    completions they hold.

    A completion with advantage 0 (its group all scored alike) has a gradient of exactly zero, so
    it is left out of the forward and backward passes, which cost most of a step; its sampled
    tokens still count in the step's normaliser (`count`, which train_step sums in place of the
    targets), so the update is the one all the rows would give. Each micro-batch keeps at least one
    row, so that a step where no group teaches anything still steps the optimizer (a zero
    gradient, as with every row)."""
    sampled = [sum(chosen) for _, chosen in rollouts]
    teaching = [i for i, a in enumerate(advantages) if a != 0]
    idle = [i for i, a in enumerate(advantages) if a == 0]
    keep = sorted(teaching + idle[:max(parts - len(teaching), 0)])  # at least one row per micro-batch
    left_out = sum(sampled) - sum(sampled[i] for i in keep)
    out = []
    for part, rows in enumerate(np.array_split(np.array(keep), parts)):
        x, y, weights = rollout_rows([prompts[i] for i in rows], [rollouts[i] for i in rows],
                                     [advantages[i] for i in rows], device)
        count = sum(sampled[i] for i in rows) + (left_out if part == 0 else 0)
        out.append((x, y, weights, torch.tensor(count, device=device)))
    return out, len(keep)


class RolloutBatches:
    """The RL stage's batches (the loop's `Batches`): each step's completions on this rank, as
    (x, y, weights) micro-batches. A step's rollouts are sampled when its first micro-batch is
    asked for, with the model as it is then (on-policy). State: the next step."""

    def __init__(self, engine: Engine, questions: Questions, cfg: RLConfig, rt: Runtime):
        self.engine, self.questions, self.cfg, self.rt = engine, questions, cfg, rt
        if cfg.prompts_per_step % rt.world_size:
            raise NanochatError(f"--prompts-per-step {cfg.prompts_per_step} is not a multiple of the {rt.world_size} "
                                "ranks")
        rows = cfg.prompts_per_step // rt.world_size * cfg.samples
        if rows % cfg.micro_batch:
            raise NanochatError(f"each rank's {rows} completions per step (--prompts-per-step / ranks × --samples) "
                                f"are not a multiple of --micro-batch {cfg.micro_batch}")
        self.accum = rows // cfg.micro_batch
        self.step = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.last_rewards: dict[str, float] = {}

    def sample(self, step: int) -> tuple[list[list[int]], list[Rollout], list[str], list[dict]]:
        """This rank's questions of `step` and `samples` completions of each (see `sample_completions`)."""
        cfg, rt = self.cfg, self.rt
        first = step * cfg.prompts_per_step
        mine = range(first + rt.rank, first + cfg.prompts_per_step, rt.world_size)
        return sample_completions(self.engine, self.questions, mine, cfg, cfg.samples, step)

    def _refill(self) -> None:
        cfg, tok = self.cfg, self.engine.tok
        prompts, rollouts, names, convs = self.sample(self.step)
        rewards = torch.tensor([score(tok, n, c, t) for n, c, (t, _) in zip(names, convs, rollouts, strict=True)])
        advantages = group_advantages(rewards.view(-1, cfg.samples), cfg.normalise_advantages).view(-1).tolist()
        self.pending, updated = update_batches(prompts, rollouts, advantages, self.accum, self.rt.device)
        self.last_rewards = self._step_metrics(rewards, names, updated)
        self.step += 1

    def _step_metrics(self, rewards: torch.Tensor, names: list[str], updated: int) -> dict[str, float]:
        """Over every rank's completions of the step (one all-reduce): the mean reward, overall and
        (several tasks) per task, and the fraction of completions that went through the update."""
        keys = [name for name, _ in self.questions.tasks]
        sums = [rewards.sum().item(), len(names), updated, len(names)]
        for key in keys:
            mine = [r for r, n in zip(rewards.tolist(), names, strict=True) if n == key]
            sums += [sum(mine), len(mine)]
        totals = torch.tensor(sums, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        means = (totals[0::2] / totals[1::2].clamp(min=1)).tolist()
        return {"reward": means[0], "updated_rows": means[1],
                **({f"reward_{k}": m for k, m in zip(keys, means[2:], strict=True)} if len(keys) > 1 else {})}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.pending:
            self._refill()
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.pending = state["step"], []

    def close(self) -> None:
        """Nothing to release; here so the stage loop treats every batch source alike."""


def train_rl(cfg: RLConfig, rt: Runtime) -> dict:
    """Run the RL stage of run `cfg.run` from its SFT checkpoint; returns a summary."""
    start_from = next((s for s in get_stage("rl").starts_from if latest(cfg.run, s)), None)
    if start_from is None:
        raise NanochatError(f"run '{cfg.run}' has no SFT checkpoint to start RL from; run `nanochat sft --run "
                            f"{cfg.run}` (or the speedrun) first")
    model, tok, sft_meta = load_stage_model(cfg.run, start_from, rt)
    if cfg.max_tokens + 1 > model.max_positions:
        raise NanochatError(f"--max-tokens {cfg.max_tokens} leaves no room for a prompt in the model's "
                            f"{model.max_positions} positions")
    engine = Engine(model, tok, rt)
    batches = RolloutBatches(engine, Questions(cfg.tasks, "train", cfg.seed), cfg, rt)
    optim = scaled_optim(cfg.optim, cfg.lr_scale)
    optimizer = build_optimizer(model, optim, cfg.prompts_per_step * cfg.samples * cfg.max_tokens)
    evaluation = PassAtK(engine, cfg, rt)
    before = evaluation.evaluate(0) if not cfg.resume else {}
    if before:
        print0("before RL: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))
    config = {**dataclasses.asdict(cfg), "model": sft_meta["config"]["model"]}
    plan = StagePlan(
        stage="rl", run=cfg.run, model=model, optimizer=optimizer, optim=optim, batches=batches,
        accum=batches.accum, total_steps=cfg.max_steps, config=config,
        resume_keys={"tasks": cfg.tasks, "run": cfg.run, "samples": cfg.samples,
                     "prompts_per_step": cfg.prompts_per_step},
        meta={"tokenizer": sft_meta["tokenizer"], "start_from": start_from, **{f"before_{k}": v for k, v in
                                                                               before.items()}},
        resume=cfg.resume, compile=cfg.compile, varying_width=True, eval_every=cfg.eval_every,
        save_every=cfg.save_every, keep_last=cfg.keep_last, evaluate=evaluation.evaluate,
        step_metrics=lambda: batches.last_rewards, opening={f"before_{k}": v for k, v in before.items()})
    print0(f"rl {cfg.run} from {start_from}: {cfg.max_steps} steps of {cfg.prompts_per_step} questions × "
           f"{cfg.samples} completions ({cfg.tasks}), {batches.accum} micro-batch(es) of {cfg.micro_batch} per rank")
    result = train_stage(plan, rt)
    summary = {"stage": "rl", "run": cfg.run, "start_from": start_from, "steps": result.steps,
               "seconds": result.seconds, **{f"before_{k}": v for k, v in before.items()}, **result.evaluation}
    after = ", ".join(f"{k} {v:.3f}" + (f" (before {before[k]:.3f})" if k in before else "")
                      for k, v in result.evaluation.items() if isinstance(v, float) and not math.isnan(v))
    print0(f"rl: {after}")
    return summary


def cli(argv: list[str]) -> int:
    cfg = parse_config(RLConfig, argv, presets=RL_PRESETS, prog="nanochat rl", description=__doc__.split("\n\n")[0])
    rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype, seed=cfg.seed)
    try:
        train_rl(cfg, rt)
    finally:
        teardown()
    return 0

