"""Sampled answers to questions with a verifiable reward, and pass@1 / pass@k over them.

The RL stage samples its rollouts here and measures its held-out pass@k here before its first
step and after its last; `nanochat eval` measures the SFT and RL models the same way, with the
RL stage's saved sampling settings, so the three figures compare like with like.

Every completion has its own random stream, seeded by (seed, step, question, sample): what it says
does not depend on batching or the number of ranks. The held-out evaluation's `step` is -1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from nanochat.chat_format import render_for_completion
from nanochat.config import RLConfig
from nanochat.engine import Engine, Sampling
from nanochat.runtime import Runtime
from nanochat.tasks import build_task, parse_spec
from nanochat.tasks.base import Task, TaskError, rng
from nanochat.tasks.rewards import REWARDS, Reply
from nanochat.tokenizer import Tokenizer

Rollout = tuple[list[int], list[bool]]  # a completion's tokens, and whether the model chose each

# The RLConfig fields that decide what pass@k measures; `nanochat eval` reads them from the RL stage.
SAMPLING_FIELDS = ("tasks", "temperature", "top_k", "max_tokens", "micro_batch", "eval_items", "eval_samples",
                   "seed")


def sample_seed(seed: int, step: int, question: int, sample: int) -> int:
    """The random stream of one completion: a function of where it is in the run alone."""
    digest = hashlib.sha256(f"rl/{seed}/{step}/{question}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Questions:
    """Questions of the tasks in `spec` (each needs a reward in tasks/rewards.py) in a fixed
    shuffled order, cycled, each with the name of its task."""

    def __init__(self, spec: str, split: str, seed: int):
        entries = parse_spec(spec)
        missing = [name for name, _ in entries if name not in REWARDS]
        if missing:
            raise TaskError(f"task(s) {', '.join(missing)} have no verifiable reward; RL tasks: {', '.join(REWARDS)}")
        self.tasks: list[tuple[str, Task]] = [(name, build_task(name, split, seed)) for name, _ in entries]
        self.order = [(t, i) for t, (_, task) in enumerate(self.tasks) for i in range(len(task))]
        rng("rl-questions", spec, split, seed).shuffle(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[str, dict]:
        t, j = self.order[i % len(self.order)]
        name, task = self.tasks[t]
        return name, task[j]


def score(tok: Tokenizer, task: str, conversation: dict, tokens: list[int]) -> float:
    """The reward of one completion of `conversation`'s question."""
    return REWARDS[task](Reply.of(tok, tokens), conversation)


def sample_completions(engine: Engine, questions: Questions, numbers: Sequence[int], cfg: RLConfig, samples: int,
                       step: int) -> tuple[list[list[int]], list[Rollout], list[str], list[dict]]:
    """`samples` completions of each question in `numbers`, with `cfg`'s sampling settings and a
    random stream per completion seeded by (seed, step, question, sample). Returns (prompts,
    rollouts, tasks, conversations), one entry per completion, sampled in micro-batches of the
    engine."""
    tok = engine.tok
    prompts, names, convs, settings = [], [], [], []
    for q in numbers:
        name, conv = questions[q]
        prompt = render_for_completion(tok, conv["messages"][:-1])
        for s in range(samples):
            prompts.append(prompt)
            names.append(name)
            convs.append(conv)
            settings.append(Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                     seed=sample_seed(cfg.seed, step, q, s)))
    rollouts: list[Rollout] = []
    for i in range(0, len(prompts), cfg.micro_batch):
        rollouts += engine.rollout(prompts[i:i + cfg.micro_batch], settings[i:i + cfg.micro_batch])
    return prompts, rollouts, names, convs


class PassAtK:
    """pass@1 and pass@k on the tasks' held-out questions (the first `eval_items` of each task's
    validation split in the shuffled order), k = `eval_samples` completions per question with
    `cfg`'s sampling settings; the questions are sharded over the ranks."""

    def __init__(self, engine: Engine, cfg: RLConfig, rt: Runtime):
        self.engine, self.cfg, self.rt = engine, cfg, rt
        self.questions = [Questions(name, "val", cfg.seed) for name, _ in parse_spec(cfg.tasks)]

    def evaluate(self, step: int = -1) -> dict:
        """{task_pass@1, task_pass@k} for each task (`step` is unused: every call samples alike)."""
        cfg, rt, tok = self.cfg, self.rt, self.engine.tok
        out: dict = {}
        for questions in self.questions:
            name = questions.tasks[0][0]
            n = min(cfg.eval_items, len(questions))
            mine = list(range(rt.rank, n, rt.world_size))
            _, rollouts, names, convs = sample_completions(self.engine, questions, mine, cfg, cfg.eval_samples, step=-1)
            rewards = [score(tok, task, c, t) for task, c, (t, _) in zip(names, convs, rollouts, strict=True)]
            per_question = torch.tensor(rewards, dtype=torch.float64).view(len(mine), cfg.eval_samples)
            sums = torch.tensor([per_question.sum().item(), per_question.max(dim=1).values.sum().item(), len(mine)],
                                dtype=torch.float64)
            if dist.is_initialized():
                dist.all_reduce(sums)
            total = max(sums[2].item(), 1)
            out[f"{name}_pass@1"] = sums[0].item() / (total * cfg.eval_samples)
            out[f"{name}_pass@{cfg.eval_samples}"] = sums[1].item() / total
        return out


def rl_sampling(saved: dict) -> RLConfig:
    """The RLConfig holding the sampling settings of an RL stage's saved config (its meta.json)."""
    return RLConfig(**{k: saved[k] for k in SAMPLING_FIELDS})
