"""CORE: the DCLM in-context-learning suite, scored as centered accuracy (0 = chance, 1 = perfect).

The bundle's format (its files, the three task types and their fields, `CoreTask`, `load_bundle`)
lives in data/core_bundle.py; this module renders a task's items into prompts and scores them.
Every option of an item becomes a (context ids, continuation ids) pair, after the task's few-shot
examples; a `Scorer` turns pairs into the mean loss of each continuation and whether greedy
decoding matches it. The lowest loss wins (multiple_choice, schema); language_modeling needs a
greedy match. The scorer is pluggable: `model_scorer` runs the GPT, tests plug in an oracle and
a random one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanochat.data.core_bundle import CoreTask, load_bundle
from nanochat.gpt import eval_mode
from nanochat.metrics import progress
from nanochat.runtime import Runtime

EXAMPLE_SEPARATOR = "\n\n"

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)
# pairs -> (mean loss of each continuation, whether greedy decoding reproduces each continuation)
Scorer = Callable[[Sequence[Pair]], tuple[list[float], list[bool]]]


# ---------------------------------------------------------------------------------------------
# Prompts


def fewshot_indices(n_items: int, index: int, k: int) -> list[int]:
    """k other items of the task, drawn with a seed of the item's index (so every run, and every
    rank, shows item `index` the same examples)."""
    k = min(k, n_items - 1)
    drawn = random.Random(1234 + index).sample(range(n_items - 1), k)
    return [j + (j >= index) for j in drawn]  # skip the item itself


def render_example(task: CoreTask, item: dict) -> str:
    """A solved example, as it appears among the few-shot examples."""
    if task.kind == "multiple_choice":
        return item["query"] + task.delimiter + item["choices"][item["gold"]]
    if task.kind == "schema":
        return item["context_options"][item["gold"]] + task.delimiter + item["continuation"]
    return item["context"] + task.delimiter + item["continuation"]


def item_pairs(task: CoreTask, index: int, tokenizer) -> list[Pair]:
    """The (context ids, continuation ids) of each option of item `index`, BOS first.

    The text of each option is tokenized whole (a delimiter space usually merges into the next
    word), then split where the options stop sharing tokens: after their common prefix when they
    differ in continuation (MC, LM), before their common suffix when they differ in context (schema).
    """
    item = task.items[index]
    shots = "".join(render_example(task, task.items[j]) + EXAMPLE_SEPARATOR
                    for j in fewshot_indices(len(task.items), index, task.num_fewshot))
    if task.kind == "schema":
        texts = [shots + context + task.delimiter + item["continuation"] for context in item["context_options"]]
        anchor = task.delimiter + item["continuation"]  # splits no later than the continuation's start
    else:
        context = shots + (item["query"] if task.kind == "multiple_choice" else item["context"])
        continuations = item["choices"] if task.kind == "multiple_choice" else [item["continuation"]]
        texts = [context + task.delimiter + c for c in continuations]
        anchor = context + task.delimiter  # splits no later than the continuation's start
    encoded = tokenizer.encode_batch([anchor, *texts], disallowed_special=())
    anchor_ids, rows = encoded[0], [[tokenizer.bos_id, *ids] for ids in encoded[1:]]
    shortest = min(len(r) for r in rows)
    if task.kind == "schema":
        n = _common_length([anchor_ids[::-1]] + [r[::-1] for r in rows])
        n = max(1, min(n, shortest - 1))  # at least one continuation token, at least BOS as context
        return [(r[:-n], r[-n:]) for r in rows]
    n = _common_length([[tokenizer.bos_id, *anchor_ids]] + rows)
    n = max(1, min(n, shortest - 1))
    return [(r[:n], r[n:]) for r in rows]


def _common_length(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of `seqs`."""
    n = 0
    for column in zip(*seqs, strict=False):  # stops at the shortest
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def is_correct(task: CoreTask, item: dict, losses: Sequence[float], greedy: Sequence[bool]) -> bool:
    if task.kind == "language_modeling":
        return bool(greedy[0])
    return min(range(len(losses)), key=losses.__getitem__) == item["gold"]


# ---------------------------------------------------------------------------------------------
# Scoring


def model_scorer(model: nn.Module, rt: Runtime) -> Scorer:
    """Score pairs with one forward pass of the model (the options of an item as one batch, padded
    on the right). A sequence longer than the model's context loses tokens from the left."""
    max_len = model.config.sequence_len

    @torch.no_grad()
    def score(pairs: Sequence[Pair]) -> tuple[list[float], list[bool]]:
        rows, starts = [], []
        for context, continuation in pairs:
            ids = (context + continuation)[-max_len:]
            rows.append(ids)
            starts.append(len(ids) - min(len(continuation), len(ids) - 1))
        x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        targets = torch.full_like(x, -1)  # targets[b, t] is the token after position t; -1 = not scored
        for b, (ids, start) in enumerate(zip(rows, starts, strict=True)):
            x[b, :len(ids)] = torch.tensor(ids)
            targets[b, start - 1:len(ids) - 1] = x[b, start:len(ids)]
        x, targets = x.to(rt.device), targets.to(rt.device)
        with rt.autocast():
            logits = model(x)
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")
        scored = targets != -1
        mean_loss = losses.sum(1) / scored.sum(1)
        greedy = ((logits.argmax(-1) == targets) | ~scored).all(1)
        return mean_loss.tolist(), greedy.tolist()

    return score


def evaluate_tasks(tasks: Sequence[CoreTask], tokenizer, scorer: Scorer, rt: Runtime,
                   max_per_task: int | None = None) -> dict:
    """Accuracy and centered accuracy of every task and CORE, their mean. Under torchrun rank r
    scores items r, r + world_size, …; the counts are summed over ranks."""
    chosen = [_chosen_items(len(t.items), max_per_task) for t in tasks]
    counts = torch.zeros(len(tasks), 2, dtype=torch.float64)  # (correct, scored) per task
    bar = progress(total=sum(len(c[rt.rank::rt.world_size]) for c in chosen), desc="CORE")
    for t, (task, indices) in enumerate(zip(tasks, chosen, strict=True)):
        bar.set_postfix_str(task.label)
        for index in indices[rt.rank::rt.world_size]:
            losses, greedy = scorer(item_pairs(task, index, tokenizer))
            counts[t, 0] += is_correct(task, task.items[index], losses, greedy)
            counts[t, 1] += 1
            bar.update()
    bar.close()
    if dist.is_initialized():
        counts = counts.to(rt.device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    results = {}
    for task, (correct, n) in zip(tasks, counts.tolist(), strict=True):
        accuracy = correct / max(n, 1)
        results[task.label] = {"accuracy": accuracy, "centered": (accuracy - task.baseline) / (1 - task.baseline),
                               "n": int(n), "baseline": task.baseline}
    core = sum(r["centered"] for r in results.values()) / max(len(results), 1)
    return {"tasks": results, "core": core}


def _chosen_items(n_items: int, max_per_task: int | None) -> list[int]:
    """Which items to score: all, or a fixed random subset (task files are often sorted, so a
    prefix would be a biased sample)."""
    if max_per_task is None or max_per_task >= n_items:
        return list(range(n_items))
    return sorted(random.Random(1337).sample(range(n_items), max_per_task))


def evaluate_core(model: nn.Module, tokenizer, bundle_dir: str | Path, rt: Runtime,
                  max_per_task: int | None = None) -> dict:
    """CORE of a model on the eval bundle in `bundle_dir`:
    {"tasks": {label: {"accuracy", "centered", "n"}}, "core": mean centered accuracy}."""
    tasks = load_bundle(bundle_dir)
    with eval_mode(model):
        return evaluate_tasks(tasks, tokenizer, model_scorer(model, rt), rt, max_per_task)
