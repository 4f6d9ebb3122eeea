"""The shared interface of every chat task, and the weighted mixture of tasks.

A task is a fixed, indexable list of conversations: `{"messages": [{"role": "user" | "assistant" |
"system", "content": ...}, ...]}`, the messages as `chat_format.render_conversation` takes them.
A conversation may carry more fields for evaluation (a multiple-choice one its `choices` and
`answer`, a HumanEval one its `problem`); training reads only the messages. A task is
deterministic: the same split and seed give the same conversations in the same order on every
machine. Randomness therefore never comes from the global RNG or from Python's salted `hash()`;
it comes from `rng(...)` (a `random.Random` seeded with a string, which CPython hashes with
SHA-512) and splits come from `in_held_out(...)` (SHA-256).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from array import array
from collections.abc import Iterator, Sequence

from nanochat.errors import NanochatError

SPLITS = ("train", "val", "test")
# the tasks built from data that ships with the package: no download, ever (the tiny preset's)
OFFLINE_TASKS = ("identity", "wiki", "spelling", "arithmetic", "wiki_mc")


class TaskError(NanochatError, ValueError):
    """A task or mixture that cannot be built as asked: bad name, split, weight or missing data."""


def rng(*key: object) -> random.Random:
    """A random generator seeded by `key` (e.g. the task name, split, seed and index), the same on
    every machine and Python version."""
    return random.Random("/".join(map(str, key)))


def in_held_out(key: str, percent: float) -> bool:
    """True for a fixed `percent` of keys, chosen by SHA-256: a split that never changes."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


def check_split(split: str, held_out: str = "val") -> str:
    """"train", or the task's held-out split (its own name for it: "val" or "test"); "val" and
    "test" are accepted for one another so that one mixture spec works for every task."""
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return "train" if split == "train" else held_out


def check_held_out(name: str, split: str, held_out: str = "test") -> str:
    """The split of a task that is only for evaluation (a published test set): "val" and "test"
    both name it; "train" is refused rather than silently training on test questions."""
    if check_split(split, held_out) == "train":
        raise TaskError(f"task {name!r} is a test set for evaluation and has no train split; use split "
                        f"{held_out!r}, or leave it out of the training mixture")
    return held_out


class Task:
    """A list of conversations. Subclasses set `name` and `split` and implement `__len__` and
    `_get(i)` for 0 <= i < len; indexing, negative indices and iteration come from here."""

    name = "task"
    split = "train"

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}[{i}] out of range ({n} conversations)")
        return self._get(i % n)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self._get(i)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} split={self.split!r}: {len(self)} conversations>"


class Mixture(Task):
    """A deterministic, shuffled interleaving of tasks.

    Each (task, weight) contributes `weight` copies of every one of its conversations per epoch:
    2 = each twice, 0.5 = a half chosen at random (a different half each epoch), 1.5 = all of
    them once and a random half again. Each epoch is shuffled on its own, so epochs come in
    different orders; `len()` counts every epoch. The order depends only on the tasks, weights,
    `seed` and `epochs`.
    """

    name = "mixture"

    def __init__(self, tasks: Sequence[tuple[Task, float]], seed: int = 0, epochs: int = 1):
        if not tasks:
            raise TaskError("a mixture needs at least one (task, weight)")
        if not isinstance(epochs, int) or epochs < 1:
            raise TaskError(f"epochs must be an integer >= 1 (got {epochs!r})")
        for task, weight in tasks:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise TaskError(f"the weight of task {task.name!r} must be a number >= 0 (got {weight!r})")
        self.tasks = [task for task, _ in tasks]
        self.weights = [float(weight) for _, weight in tasks]
        self.seed, self.epochs = seed, epochs
        splits = {task.split for task in self.tasks}
        self.split = splits.pop() if len(splits) == 1 else "mixed"
        self._starts = [0]  # task t owns flat ids _starts[t] .. _starts[t + 1] - 1
        for task in self.tasks:
            self._starts.append(self._starts[-1] + len(task))
        self._order = array("q")
        for epoch in range(epochs):
            r = rng("mixture", seed, epoch)
            ids: list[int] = []
            for start, task, weight in zip(self._starts[:-1], self.tasks, self.weights, strict=True):
                n, whole = len(task), int(weight)
                ids.extend(list(range(start, start + n)) * whole)
                extra = round((weight - whole) * n)
                ids.extend(start + j for j in r.sample(range(n), extra))
            r.shuffle(ids)
            self._order.extend(ids)

    def __len__(self) -> int:
        return len(self._order)

    def locate(self, i: int) -> tuple[Task, int]:
        """The task and index within it of the mixture's i-th conversation."""
        flat = self._order[i]
        t = bisect.bisect_right(self._starts, flat) - 1
        return self.tasks[t], flat - self._starts[t]

    def _get(self, i: int) -> dict:
        task, j = self.locate(i)
        return task[j]

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.name}:{w:g}" for t, w in zip(self.tasks, self.weights, strict=True))
        return f"<Mixture [{parts}] x{self.epochs} epochs, seed={self.seed}: {len(self)} conversations>"
