"""Chat tasks: conversations for midtraining, SFT and evaluation, one file each, one interface.

Every task is a `Task` (tasks/base.py): `len(task)` conversations, `task[i]` one of them
(`{"messages": [...]}`, plus the fields an evaluation needs), deterministic for a given split and
seed. `build_task(name, split, seed)` makes one by its name in TASKS; a `Mixture` interleaves
weighted tasks, and `build_mixture("identity:2,wiki,spelling", split, seed)` makes one from a
config string. The chat evaluation (evaluate/chat.py) reads its tasks through the same names.

Offline (no network; the tiny preset's): identity, wiki, spelling, arithmetic, and wiki_mc
(multiple choice about held-out articles). Online (downloaded once from the Hugging Face hub):
smoltalk, mmlu (auxiliary train), gsm8k, arc_easy and arc_challenge (train and test), and the
test sets mmlu_test and humaneval, which have no train split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from nanochat.tasks.arc import ARCChallenge, ARCEasy
from nanochat.tasks.arithmetic import ArithmeticTask
from nanochat.tasks.base import OFFLINE_TASKS, Mixture, Task, TaskError
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import IdentityTask
from nanochat.tasks.mmlu import MMLU, MMLUTest
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spelling import SpellingTask
from nanochat.tasks.wiki import WikiTask, wiki_eval_items
from nanochat.tasks.wiki_mc import WikiMC

# name -> constructor(split, seed)
TASKS: dict[str, Callable[..., Task]] = {
    "identity": IdentityTask,
    "wiki": WikiTask,
    "spelling": SpellingTask,
    "arithmetic": ArithmeticTask,
    "smoltalk": SmolTalk,
    "mmlu": MMLU,
    "gsm8k": GSM8K,
    "wiki_mc": WikiMC,
    "arc_easy": ARCEasy,
    "arc_challenge": ARCChallenge,
    "mmlu_test": MMLUTest,
    "humaneval": HumanEval,
}

# Midtraining teaches the format, tool use, identity and spelling on plenty of data (about 24k
# conversations per epoch); SFT is a smaller, cleaner pass over the same kinds (about 5.5k).
OFFLINE_MIDTRAIN = "identity:2,wiki:0.5,spelling:1,arithmetic:1"
OFFLINE_SFT = "identity:1,wiki:0.3,spelling:0.2,arithmetic:0.2"


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """"identity:2,wiki,spelling:0.5" -> [("identity", 2.0), ("wiki", 1.0), ("spelling", 0.5)]."""
    entries: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, _, weight_text = item.strip().partition(":")
        name = name.strip().lower()
        if not name:
            raise TaskError(f"empty task name in task mixture {spec!r}; write e.g. {OFFLINE_MIDTRAIN!r}")
        if name not in TASKS:
            raise TaskError(f"unknown task {name!r} in task mixture {spec!r}; valid tasks: {', '.join(TASKS)}")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            weight = -1.0
        if not math.isfinite(weight) or weight < 0:
            raise TaskError(f"task {name!r} in task mixture {spec!r} has weight {weight_text.strip()!r}; a weight "
                            f"is a number >= 0 (how many times each conversation is used per epoch)")
        if name in (n for n, _ in entries):
            raise TaskError(f"task {name!r} appears twice in task mixture {spec!r}; give it one weight")
        entries.append((name, weight))
    return entries


def build_task(name: str, split: str = "train", seed: int = 0) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name](split=split, seed=seed)


def build_mixture(spec: str, split: str, seed: int, epochs: int = 1) -> Mixture:
    """The mixture a config string names, e.g. "identity:2,wiki:1,spelling,arithmetic" (weight
    1 when left out). split "train", or "val"/"test" for every task's held-out split."""
    entries = parse_spec(spec)
    return Mixture([(build_task(name, split, seed), weight) for name, weight in entries], seed=seed, epochs=epochs)


__all__ = ["ARCChallenge", "ARCEasy", "ArithmeticTask", "GSM8K", "HumanEval", "IdentityTask", "MMLU", "MMLUTest",
           "Mixture", "OFFLINE_MIDTRAIN", "OFFLINE_SFT", "OFFLINE_TASKS", "SmolTalk", "SpellingTask", "TASKS", "Task",
           "TaskError", "WikiMC", "WikiTask", "build_mixture", "build_task", "parse_spec", "wiki_eval_items"]
