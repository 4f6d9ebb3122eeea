"""CORE: the DCLM in-context-learning suite, scored as centered accuracy (0 = chance, 1 = perfect).

An eval bundle is a folder with `core.yaml` (the tasks), `eval_meta_data.csv` (each task's random
baseline, in percent) and `eval_data/<dataset_uri>` (one JSON object per line). Three task types:

    multiple_choice   {"query", "choices", "gold"}          the choices differ in continuation
    schema            {"context_options", "continuation", "gold"}   the options differ in context
    language_modeling {"context", "continuation"}           right iff greedy decoding reproduces it

Every option becomes a (context ids, continuation ids) pair; a `Scorer` turns pairs into the mean
loss of each continuation and whether greedy decoding matches it. The lowest loss wins (MC,
schema); LM needs a greedy match. The scorer is pluggable: `model_scorer` runs the GPT, tests
plug in an oracle and a random one.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanochat.errors import NanochatError
from nanochat.metrics import progress
from nanochat.runtime import Runtime

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
EXAMPLE_SEPARATOR = "\n\n"
BUNDLE_HINT = ("an eval bundle is a folder with core.yaml, eval_meta_data.csv and eval_data/ "
               "(the DCLM / nanochat eval_bundle); download and unpack it, then pass that folder")

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)
# pairs -> (mean loss of each continuation, whether greedy decoding reproduces each continuation)
Scorer = Callable[[Sequence[Pair]], tuple[list[float], list[bool]]]


@dataclass(frozen=True)
class Task:
    label: str
    kind: str  # one of TASK_TYPES
    num_fewshot: int
    delimiter: str  # between context and continuation
    baseline: float  # accuracy of random guessing, as a fraction
    items: list[dict]


# ---------------------------------------------------------------------------------------------
# The bundle on disk


def load_bundle(bundle_dir: str | Path) -> list[Task]:
    """The tasks of an eval bundle, validated, so that a bad file fails here and not an hour in."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise NanochatError(f"CORE eval bundle {root} is not a folder; {BUNDLE_HINT}")
    specs = _read_task_specs(root / "core.yaml")
    baselines = _read_baselines(root / "eval_meta_data.csv")
    tasks = []
    for spec in specs:
        label = spec["label"]
        if label not in baselines:
            raise NanochatError(f"task '{label}' of {root / 'core.yaml'} has no row in "
                                f"{root / 'eval_meta_data.csv'} (its 'Eval Task' column); add its random baseline")
        items = _read_items(root / "eval_data" / spec["dataset_uri"], spec["kind"])
        tasks.append(Task(label, spec["kind"], spec["num_fewshot"], spec["delimiter"], baselines[label], items))
    return tasks


def _read_task_specs(path: Path) -> list[dict]:
    import yaml  # PyYAML arrives with huggingface-hub

    if not path.is_file():
        raise NanochatError(f"{path} is missing; {BUNDLE_HINT}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NanochatError(f"{path} is not valid YAML ({e}); restore it from the eval bundle") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else config
    if not isinstance(entries, list) or not entries:
        raise NanochatError(f"{path} lists no tasks: expected 'icl_tasks:' with a list of tasks")
    specs = []
    for n, entry in enumerate(entries, 1):
        where = f"{path}, task {n}"
        if not isinstance(entry, dict):
            raise NanochatError(f"{where} is not a mapping of label, dataset_uri, num_fewshot, icl_task_type")
        missing = [k for k in ("label", "dataset_uri", "icl_task_type") if k not in entry]
        if missing:
            raise NanochatError(f"{where} lacks {', '.join(missing)}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise NanochatError(f"{where} ('{entry['label']}') has icl_task_type {entry['icl_task_type']!r}; "
                                f"expected one of {', '.join(TASK_TYPES)}")
        shots = entry.get("num_fewshot", 0)
        if isinstance(shots, list):  # DCLM writes e.g. [10]: one run per count; CORE uses one
            shots = shots[0] if len(shots) == 1 else None
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise NanochatError(f"{where} ('{entry['label']}') has num_fewshot {entry.get('num_fewshot')!r}; "
                                "expected one non-negative integer")
        specs.append({"label": str(entry["label"]), "dataset_uri": str(entry["dataset_uri"]),
                      "kind": entry["icl_task_type"], "num_fewshot": shots,
                      "delimiter": str(entry.get("continuation_delimiter", " "))})
    return specs


def _read_baselines(path: Path) -> dict[str, float]:
    """Task label -> random baseline as a fraction (the CSV has it in percent)."""
    if not path.is_file():
        raise NanochatError(f"{path} is missing; {BUNDLE_HINT}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise NanochatError(f"{path} is not a readable CSV ({e}); restore it from the eval bundle") from None
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise NanochatError(f"{path} needs the columns 'Eval Task' and 'Random baseline'")
    baselines = {}
    for n, row in enumerate(rows, 2):
        try:
            baseline = float(row["Random baseline"]) / 100
        except (TypeError, ValueError):
            raise NanochatError(f"{path}:{n}: random baseline {row['Random baseline']!r} is not a number") from None
        if not 0 <= baseline < 1:
            raise NanochatError(f"{path}:{n}: random baseline {row['Random baseline']} must be in [0, 100)")
        baselines[row["Eval Task"]] = baseline
    return baselines


def _read_items(path: Path, kind: str) -> list[dict]:
    if not path.is_file():
        raise NanochatError(f"{path} is missing; {BUNDLE_HINT}")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanochatError(f"{path}:{n}: not a JSON object ({e}); "
                                   "restore the file from the eval bundle") from None
            problem = _item_problem(item, kind)
            if problem:
                raise NanochatError(f"{path}:{n}: {problem} (a {kind} row)")
            items.append(item)
    if not items:
        raise NanochatError(f"{path} has no examples; restore it from the eval bundle")
    return items


def _item_problem(item, kind: str) -> str | None:
    """What is wrong with one row, or None."""
    if not isinstance(item, dict):
        return "expected a JSON object"
    fields = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
              "language_modeling": ("context", "continuation")}[kind]
    missing = [k for k in fields if k not in item]
    if missing:
        return f"missing {', '.join(missing)}"
    if kind == "language_modeling":
        return None
    options = item["choices" if kind == "multiple_choice" else "context_options"]
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        return "the options must be a non-empty list of strings"
    gold = item["gold"]
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
        return f"gold {gold!r} is not an index into its {len(options)} options"
    return None


# ---------------------------------------------------------------------------------------------
# Prompts


def fewshot_indices(n_items: int, index: int, k: int) -> list[int]:
    """k other items of the task, drawn with a seed of the item's index (so every run, and every
    rank, shows item `index` the same examples)."""
    k = min(k, n_items - 1)
    drawn = random.Random(1234 + index).sample(range(n_items - 1), k)
    return [j + (j >= index) for j in drawn]  # skip the item itself


def render_example(task: Task, item: dict) -> str:
    """A solved example, as it appears among the few-shot examples."""
    if task.kind == "multiple_choice":
        return item["query"] + task.delimiter + item["choices"][item["gold"]]
    if task.kind == "schema":
        return item["context_options"][item["gold"]] + task.delimiter + item["continuation"]
    return item["context"] + task.delimiter + item["continuation"]


def item_pairs(task: Task, index: int, tokenizer) -> list[Pair]:
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


def is_correct(task: Task, item: dict, losses: Sequence[float], greedy: Sequence[bool]) -> bool:
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


def evaluate_tasks(tasks: Sequence[Task], tokenizer, scorer: Scorer, rt: Runtime,
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
    was_training = model.training
    model.eval()
    try:
        return evaluate_tasks(tasks, tokenizer, model_scorer(model, rt), rt, max_per_task)
    finally:
        model.train(was_training)
