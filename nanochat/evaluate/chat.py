"""Chat evaluations: how well a chat model (after midtraining or SFT) answers held-out tasks.

Two kinds of task:
  multiple choice  the question and lettered choices as a user message (the MMLU task's
                   rendering); the model's answer is the choice whose letter it finds most likely
                   as the first token of its reply, among the valid letters. No generation, and
                   no penalty for a model that would have written the letter in another format.
                   Baseline (guessing): 1 / number of choices.
  generative       a greedy reply from the engine (stopped at <|assistant_end|>), scored by exact
                   match of its final answer; HumanEval by running the code against the task's
                   tests in the sandbox. Baseline 0. Tool calls (<|python_start|>expr<|python_end|>)
                   are executed by the engine, which forces their output into the reply, as in
                   chat; this module only generates and scores (`generate` swaps the generation).

ChatCORE is the mean over the tasks run of the centered accuracy, (accuracy - baseline) /
(1 - baseline): 0 for guessing, 1 for perfect.

Offline tasks (no network): wiki_mc (which description fits a held-out Wikipedia article?),
spelling and arithmetic (their held-out splits). Online (downloaded once from the Hugging Face
hub): arc_easy, arc_challenge, mmlu (the "all" test set), gsm8k, humaneval.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanochat.engine import Engine
from nanochat.evaluate.sandbox import run_program
from nanochat.metrics import progress
from nanochat.runtime import Runtime
from nanochat.tasks.base import TaskError, rng
from nanochat.tasks.gsm8k import extract_answer
from nanochat.tasks.hub import fetch, read_parquet
from nanochat.tasks.mmlu import LETTERS, multiple_choice
from nanochat.tokenizer import Tokenizer

# (question, choices, index of the right choice, subject or "")
MCItem = tuple[str, list[str], int, str]
# token-id prompts -> token-id replies
Generate = Callable[[list[list[int]]], list[list[int]]]

OFFLINE_CHAT_TASKS = ("wiki_mc", "spelling", "arithmetic")
WIKI_DISTRACTORS = 3

# ---------------------------------------------------------------------------------------------
# Multiple choice


def mc_prompt(tok: Tokenizer, question: str, choices: Sequence[str], subject: str = "") -> list[int]:
    """The prompt for a multiple-choice question, ending with <|assistant_start|>."""
    user = multiple_choice(question, list(choices), 0, subject)["messages"][0]
    return tok.render_for_completion([user])


def letter_ids(tok: Tokenizer, n: int) -> list[list[int]]:
    """For each of the first n letters, the single tokens that spell it ("A" and " A"; training
    answers are the bare letter, a base model may prefer the spaced one)."""
    out = []
    for letter in LETTERS[:n]:
        ids = {tuple(tok.encode_ordinary(form)) for form in (letter, " " + letter)}
        out.append(sorted(t[0] for t in ids if len(t) == 1))
        if not out[-1]:
            raise TaskError(f"the tokenizer has no single token for the letter {letter!r}")
    return out


@torch.no_grad()
def mc_predictions(model: nn.Module, tok: Tokenizer, items: Sequence[MCItem], rt: Runtime,
                   batch_size: int = 16) -> list[int]:
    """The index of the choice the model picks for each item: the valid letter (any of its
    forms) with the highest logit right after <|assistant_start|>."""
    was_training = model.training
    model.eval()
    letters = {n: letter_ids(tok, n) for n in {len(item[1]) for item in items}}
    picks = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [mc_prompt(tok, q, choices, subject) for q, choices, _, subject in batch]
        width = max(map(len, prompts))
        # right padding: with causal attention it cannot change the logits at each prompt's end
        idx = torch.tensor([p + [tok.bos_id] * (width - len(p)) for p in prompts], device=rt.device)
        with rt.autocast():
            logits = model(idx)
        last = logits[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])].float().cpu()
        for row, (_, choices, _, _) in zip(last, batch, strict=True):
            scores = [row[ids].max().item() for ids in letters[len(choices)]]
            picks.append(max(range(len(scores)), key=scores.__getitem__))
    model.train(was_training)
    return picks


def mc_accuracy(model: nn.Module, tok: Tokenizer, items: Sequence[tuple], rt: Runtime) -> float:
    """Share of items [(question, choices, gold_index) or (..., subject)] answered right."""
    items = [_mc_item(item) for item in items]
    picks = mc_predictions(model, tok, items, rt)
    return sum(p == item[2] for p, item in zip(picks, items, strict=True)) / max(len(items), 1)


def _mc_item(item: tuple) -> MCItem:
    question, choices, gold = item[:3]
    return question, list(choices), int(gold), item[3] if len(item) > 3 else ""


# ---------------------------------------------------------------------------------------------
# Multiple-choice data

ARC_REPO, ARC_FILES = "allenai/ai2_arc", {"arc_easy": "ARC-Easy/test-00000-of-00001.parquet",
                                          "arc_challenge": "ARC-Challenge/test-00000-of-00001.parquet"}
MMLU_REPO, MMLU_TEST = "cais/mmlu", "all/test-00000-of-00001.parquet"


def load_arc(name: str = "arc_easy") -> list[MCItem]:
    """ARC-Easy or ARC-Challenge test questions (columns question, choices {text, label},
    answerKey); labels ("A".."E" or "1".."5") are shown as letters A, B, ..."""
    table = read_parquet(fetch("arc", ARC_REPO, [ARC_FILES[name]]), ["question", "choices", "answerKey"])
    items = []
    for row in table.to_pylist():
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        if row["answerKey"] not in labels:
            raise TaskError(f"ARC question {row['question'][:60]!r} has answer {row['answerKey']!r}, not one of "
                            f"its labels {labels}: delete the file and run again to download it afresh")
        items.append((row["question"], texts, labels.index(row["answerKey"]), ""))
    return items


def load_mmlu() -> list[MCItem]:
    """MMLU's 14k test questions, all 57 subjects (cais/mmlu "all": question, subject, choices, answer)."""
    table = read_parquet(fetch("mmlu", MMLU_REPO, [MMLU_TEST]), ["question", "subject", "choices", "answer"])
    return [(r["question"], r["choices"], r["answer"], r["subject"] or "") for r in table.to_pylist()]


def wiki_mc_items(seed: int = 0) -> list[MCItem]:
    """"Which description fits X?" for every held-out Wikipedia article with a description: its
    own and WIKI_DISTRACTORS others' from held-out articles in the same language, in an order
    drawn from `seed`."""
    from nanochat.tasks.wiki import articles

    pool = [a for a in articles("val") if a["description"].strip()]
    by_lang: dict[str, list[dict]] = {}
    for a in pool:
        by_lang.setdefault(a["lang"], []).append(a)
    items = []
    for a in pool:
        r = rng("wiki-mc", seed, a["lang"], a["title"])
        truth = _description(a)
        others = sorted({_description(b) for b in by_lang[a["lang"]]} - {truth})
        if len(others) < WIKI_DISTRACTORS:
            continue
        choices = r.sample(others, WIKI_DISTRACTORS) + [truth]
        r.shuffle(choices)
        items.append((f"Which description fits {a['title']}?", choices, choices.index(truth), ""))
    rng("wiki-mc", seed).shuffle(items)  # languages mixed, so that the first max_items are a fair sample
    return items


def _description(article: dict) -> str:
    text = article["description"].replace("\xa0", " ").strip()
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------
# Generative tasks: (question, reference) items and a score(reply, reference) -> bool

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_SPELLED = re.compile(r"\b[a-z](?:-[a-z])+\b")


def final_number(text: str) -> float | None:
    """The last number in `text` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _same_number(a: float | str | None, b: float | str | None) -> bool:
    return a is not None and b is not None and float(a) == float(b)


def _assistant_text(conversation: dict) -> str:
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def score_arithmetic(reply: str, reference: str) -> bool:
    return _same_number(final_number(reply), final_number(reference))


def score_gsm8k(reply: str, reference: str) -> bool:
    """The number after the reply's last '####' equals the reference's."""
    return _same_number(extract_answer(reply), extract_answer(reference))


def spelling_answer(text: str) -> str | None:
    """The final answer of a spelling reply: the last spelled-out word ("c-a-t") or number."""
    found = re.findall(f"{_SPELLED.pattern}|{_NUMBER.pattern}", text)
    return found[-1].replace(",", "") if found else None


def score_spelling(reply: str, reference: str) -> bool:
    expected = spelling_answer(reference)
    return expected is not None and spelling_answer(reply) == expected


def extract_code(reply: str) -> str:
    """The code of a reply: its first ```-fenced block if it has one, else the whole reply."""
    fenced = re.search(r"```[\w+-]*\n(.*?)(?:```|$)", reply, re.DOTALL)
    return fenced.group(1) if fenced else reply


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that tests a completion: prompt + completion (a body that continues the prompt,
    or a whole function that redefines it) + the task's tests + check(entry_point)."""
    return (f"{problem['prompt']}{extract_code(completion)}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def score_humaneval(reply: str, problem: dict) -> bool:
    return run_program(humaneval_program(problem, reply), timeout_s=10.0).passed


def _task_items(name: str, max_items: int | None) -> list[tuple[str, str]]:
    from nanochat.tasks import build_task

    task = build_task(name, "val")
    n = len(task) if max_items is None else min(len(task), max_items)
    return [(c["messages"][0]["content"], _assistant_text(c)) for c in (task[i] for i in range(n))]


HUMANEVAL_REPO, HUMANEVAL_FILE = "openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet"


def load_humaneval() -> list[tuple[str, dict]]:
    """HumanEval's 164 problems (task_id, prompt, canonical_solution, test, entry_point) as
    (user message, problem) items."""
    table = read_parquet(fetch("humaneval", HUMANEVAL_REPO, [HUMANEVAL_FILE]),
                         ["task_id", "prompt", "canonical_solution", "test", "entry_point"])
    return [(f"Complete this Python function.\n\n```python\n{p['prompt']}```", p) for p in table.to_pylist()]


# ---------------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True)
class ChatTask:
    kind: str  # "mc" or "generative"
    load: Callable[[int | None], list]  # max_items -> items (MCItem, or (question, reference))
    score: Callable[[str, object], bool] | None = None  # generative: (reply, reference) -> correct
    max_new_tokens: int = 256


def _first(items: list, max_items: int | None, shuffle: str = "") -> list:
    """The first max_items items; for a file sorted by topic (`shuffle` = a seed key), after a
    fixed shuffle, so that a few items are a fair sample of all topics."""
    if shuffle and max_items is not None and max_items < len(items):
        items = list(items)
        rng(shuffle).shuffle(items)
    return items if max_items is None else items[:max_items]


CHAT_TASKS: dict[str, ChatTask] = {
    "wiki_mc": ChatTask("mc", lambda n: _first(wiki_mc_items(), n)),
    "arc_easy": ChatTask("mc", lambda n: _first(load_arc("arc_easy"), n)),
    "arc_challenge": ChatTask("mc", lambda n: _first(load_arc("arc_challenge"), n)),
    "mmlu": ChatTask("mc", lambda n: _first(load_mmlu(), n, shuffle="mmlu-eval")),
    "spelling": ChatTask("generative", lambda n: _task_items("spelling", n), score_spelling, 128),
    "arithmetic": ChatTask("generative", lambda n: _task_items("arithmetic", n), score_arithmetic, 128),
    "gsm8k": ChatTask("generative", lambda n: _task_items("gsm8k", n), score_gsm8k, 512),
    "humaneval": ChatTask("generative", lambda n: _first(load_humaneval(), n), score_humaneval, 512),
}


def greedy_generate(model: nn.Module, tok: Tokenizer, rt: Runtime, max_new_tokens: int,
                    batch_size: int = 16) -> Generate:
    """Greedy replies to token-id prompts from the engine (tool calls executed), each stopped
    after <|assistant_end|> or max_new_tokens, cut to the positions the model has left."""
    engine = Engine(model, tok, rt)

    def run(prompts: list[list[int]]) -> list[list[int]]:
        out = []
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            room = engine.context - max(map(len, batch))
            out += engine.complete(batch, max_tokens=max(1, min(max_new_tokens, room)))
        return out

    return run


def reply_text(tok: Tokenizer, ids: list[int]) -> str:
    """A reply's text, without the token that closed it (<|assistant_end|>, or <|bos|>)."""
    stops = {tok.special_id("<|assistant_end|>"), tok.bos_id}
    return tok.decode(ids[:-1] if ids and ids[-1] in stops else ids)


def _all_reduce(values: list[float], rt: Runtime) -> list[float]:
    if not (rt.distributed and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def evaluate_chat(model: nn.Module, tok: Tokenizer, rt: Runtime, tasks: Sequence[str] = OFFLINE_CHAT_TASKS,
                  max_items: int | None = None, batch_size: int = 16,
                  generate: Callable[[int], Generate] | None = None) -> dict:
    """Accuracy on each task and ChatCORE: {"tasks": {name: {accuracy, centered, correct, total,
    baseline}}, "chatcore": mean centered accuracy}. Each rank evaluates every world_size-th item
    of the first `max_items` of each task; counts are summed over ranks, so every rank returns
    the same numbers. generate(max_new_tokens) -> Generate replaces greedy decoding (e.g. the
    engine's, with tool use)."""
    unknown = [t for t in tasks if t not in CHAT_TASKS]
    if unknown or not tasks:
        raise TaskError(f"unknown chat evaluation task(s) {unknown}; choose from {', '.join(CHAT_TASKS)}")
    make_generate = generate or (lambda n: greedy_generate(model, tok, rt, n, batch_size))
    loaded = {name: CHAT_TASKS[name].load(max_items) for name in tasks}
    mine = {name: items[rt.rank::rt.world_size] for name, items in loaded.items()}
    results = {}
    with progress(total=sum(map(len, mine.values())), desc="chat eval") as bar:
        for name in tasks:
            task, items = CHAT_TASKS[name], mine[name]
            bar.set_postfix_str(name)
            correct = chance = 0.0
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                if task.kind == "mc":
                    picks = mc_predictions(model, tok, batch, rt, batch_size)
                    correct += sum(p == item[2] for p, item in zip(picks, batch, strict=True))
                    chance += sum(1 / len(item[1]) for item in batch)
                else:
                    prompts = [tok.render_for_completion([{"role": "user", "content": q}]) for q, _ in batch]
                    replies = make_generate(task.max_new_tokens)(prompts)
                    correct += sum(task.score(reply_text(tok, r), ref)
                                   for r, (_, ref) in zip(replies, batch, strict=True))
                bar.update(len(batch))
            correct, chance, total = _all_reduce([correct, chance, len(items)], rt)
            accuracy = correct / total if total else 0.0
            baseline = chance / total if total else 0.0
            results[name] = {"accuracy": accuracy, "centered": (accuracy - baseline) / (1 - baseline),
                             "correct": int(correct), "total": int(total), "baseline": baseline}
    return {"tasks": results, "chatcore": sum(r["centered"] for r in results.values()) / len(results)}
