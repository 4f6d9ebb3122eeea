"""Chat evaluations: how well a chat model (after midtraining or SFT) answers held-out tasks.

The questions are tasks of nanochat.tasks, read through the Task interface (each task's held-out
split, in its own order); this module only scores them. CHAT_TASKS names each evaluation, the
task it reads and how it is scored. Two kinds:
  multiple choice  a `multiple_choice` conversation (tasks/multiple_choice.py): the prompt is its
                   user message with the lettered choices, and the model's answer is the choice
                   whose letter it finds most likely as the first token of its reply, among the
                   valid letters. No generation, and no penalty for a model that would have
                   written the letter in another format. Baseline (guessing): 1 / number of choices.
  generative       a greedy reply from the engine (stopped at <|assistant_end|>), scored by exact
                   match of its final answer against the conversation's own reply; HumanEval by
                   running the code against the problem's tests in the sandbox. Baseline 0. Tool
                   calls (<|python_start|>expr<|python_end|>) are executed by the engine, which
                   forces their output into the reply, as in chat (`generate` swaps the generation).

ChatCORE is the mean over the tasks run of the centered accuracy, (accuracy - baseline) /
(1 - baseline): 0 for guessing, 1 for perfect.

Offline evaluations (no network): wiki_mc (which description fits a held-out Wikipedia
article?), spelling and arithmetic. Online (downloaded once from the Hugging Face hub):
arc_easy, arc_challenge, mmlu (the task mmlu_test: all 57 subjects), gsm8k, humaneval.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanochat.chat_format import render_for_completion, reply_text
from nanochat.engine import Engine, Sampling
from nanochat.evaluate.sandbox import run_program
from nanochat.gpt import eval_mode
from nanochat.metrics import progress
from nanochat.runtime import Runtime
from nanochat.tasks import build_task
from nanochat.tasks.base import TaskError, rng
from nanochat.tasks.gsm8k import extract_answer
from nanochat.tasks.multiple_choice import LETTERS
from nanochat.tokenizer import Tokenizer

# token-id prompts -> token-id replies
Generate = Callable[[list[list[int]]], list[list[int]]]

OFFLINE_CHAT_TASKS = ("wiki_mc", "spelling", "arithmetic")


def prompt_ids(tok: Tokenizer, conversation: dict) -> list[int]:
    """A conversation's prompt: every message before the assistant's last reply, then
    <|assistant_start|>."""
    return render_for_completion(tok, conversation["messages"][:-1])


# ---------------------------------------------------------------------------------------------
# Multiple choice: conversations with `choices` and `answer` (the gold index)


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
def mc_predictions(model: nn.Module, tok: Tokenizer, conversations: Sequence[dict], rt: Runtime,
                   batch_size: int = 16) -> list[int]:
    """The index of the choice the model picks for each conversation: the valid letter (any of
    its forms) with the highest logit right after <|assistant_start|>."""
    letters = {n: letter_ids(tok, n) for n in {len(c["choices"]) for c in conversations}}
    picks = []
    with eval_mode(model):
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start:start + batch_size]
            prompts = [prompt_ids(tok, c) for c in batch]
            width = max(map(len, prompts))
            # right padding: with causal attention it cannot change the logits at each prompt's end
            idx = torch.tensor([p + [tok.bos_id] * (width - len(p)) for p in prompts], device=rt.device)
            with rt.autocast():
                logits = model(idx)
            last = logits[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])].float().cpu()
            for row, c in zip(last, batch, strict=True):
                scores = [row[ids].max().item() for ids in letters[len(c["choices"])]]
                picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def mc_accuracy(model: nn.Module, tok: Tokenizer, conversations: Sequence[dict], rt: Runtime) -> float:
    """Share of multiple-choice conversations answered right."""
    picks = mc_predictions(model, tok, conversations, rt)
    return sum(p == c["answer"] for p, c in zip(picks, conversations, strict=True)) / max(len(conversations), 1)


# ---------------------------------------------------------------------------------------------
# Generative scoring: score(reply, reference) -> bool, the reference taken from the conversation

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_SPELLED = re.compile(r"\b[a-z](?:-[a-z])+\b")


def final_number(text: str) -> float | None:
    """The last number in `text` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _same_number(a: float | str | None, b: float | str | None) -> bool:
    return a is not None and b is not None and float(a) == float(b)


def assistant_text(conversation: dict) -> str:
    """The text of a conversation's last reply (tool-call parts included, as the model writes them)."""
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


def humaneval_problem(conversation: dict) -> dict:
    return conversation["problem"]


# ---------------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True)
class ChatTask:
    task: str  # the name of the task in nanochat.tasks.TASKS; its held-out split is evaluated
    kind: str  # "mc" or "generative"
    score: Callable[[str, object], bool] | None = None  # generative: (reply, reference) -> correct
    max_new_tokens: int = 256
    reference: Callable[[dict], object] = assistant_text  # generative: conversation -> what score compares with
    shuffle: str = ""  # a seed key for tasks sorted by topic; see load

    def load(self, max_items: int | None = None) -> list[dict]:
        """The conversations to evaluate: the first max_items of the task, in its order; for a
        task sorted by topic (`shuffle`), after a fixed shuffle, so that a few are a fair sample
        of all topics."""
        task = build_task(self.task, "test")
        order = list(range(len(task)))
        if self.shuffle and max_items is not None and max_items < len(order):
            rng(self.shuffle).shuffle(order)
        return [task[i] for i in order[:max_items]]


CHAT_TASKS: dict[str, ChatTask] = {
    "wiki_mc": ChatTask("wiki_mc", "mc"),
    "arc_easy": ChatTask("arc_easy", "mc"),
    "arc_challenge": ChatTask("arc_challenge", "mc"),
    "mmlu": ChatTask("mmlu_test", "mc", shuffle="mmlu-eval"),
    "spelling": ChatTask("spelling", "generative", score_spelling, 128),
    "arithmetic": ChatTask("arithmetic", "generative", score_arithmetic, 128),
    "gsm8k": ChatTask("gsm8k", "generative", score_gsm8k, 512),
    "humaneval": ChatTask("humaneval", "generative", score_humaneval, 512, reference=humaneval_problem),
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
            out += engine.complete(batch, Sampling(max_tokens=max(1, min(max_new_tokens, room))))
        return out

    return run


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
    baseline}}, "chatcore": mean centered accuracy}. Each rank evaluates every world_size-th
    conversation of the first `max_items` of each task; counts are summed over ranks, so every
    rank returns the same numbers. generate(max_new_tokens) -> Generate replaces greedy decoding."""
    unknown = [t for t in tasks if t not in CHAT_TASKS]
    if unknown or not tasks:
        raise TaskError(f"unknown chat evaluation task(s) {unknown}; choose from {', '.join(CHAT_TASKS)}")
    make_generate = generate or (lambda n: greedy_generate(model, tok, rt, n, batch_size))
    loaded = {name: CHAT_TASKS[name].load(max_items) for name in tasks}
    mine = {name: conversations[rt.rank::rt.world_size] for name, conversations in loaded.items()}
    results = {}
    with progress(total=sum(map(len, mine.values())), desc="chat eval") as bar:
        for name in tasks:
            task, conversations = CHAT_TASKS[name], mine[name]
            bar.set_postfix_str(name)
            correct = chance = 0.0
            for start in range(0, len(conversations), batch_size):
                batch = conversations[start:start + batch_size]
                if task.kind == "mc":
                    picks = mc_predictions(model, tok, batch, rt, batch_size)
                    correct += sum(p == c["answer"] for p, c in zip(picks, batch, strict=True))
                    chance += sum(1 / len(c["choices"]) for c in batch)
                else:
                    replies = make_generate(task.max_new_tokens)([prompt_ids(tok, c) for c in batch])
                    correct += sum(task.score(reply_text(tok, r), task.reference(c))
                                   for r, c in zip(replies, batch, strict=True))
                bar.update(len(batch))
            correct, chance, total = _all_reduce([correct, chance, len(conversations)], rt)
            accuracy = correct / total if total else 0.0
            baseline = chance / total if total else 0.0
            results[name] = {"accuracy": accuracy, "centered": (accuracy - baseline) / (1 - baseline),
                             "correct": int(correct), "total": int(total), "baseline": baseline}
    return {"tasks": results, "chatcore": sum(r["centered"] for r in results.values()) / len(results)}
