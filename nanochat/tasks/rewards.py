"""Verifiable rewards: whether a sampled reply gets a task's answer right, 1.0 or 0.0.

Reinforcement learning optimises exactly what these functions pay for, so they are strict where
a lenient reading could be gamed:

- A reply that did not finish (cut off by the token budget before <|assistant_end|>) earns
  nothing. Otherwise a model could ramble until the budget runs out and collect a reward
  whenever the right number went past.
- Only the assistant's own text counts. A number inside a calculator call or the tool's forced
  output is not an answer until the assistant states it.
- The answer is the last one the reply states, and the sentence stating it must hold no other
  candidate ("it is 12 or 13" answers nothing). Earlier numbers are working and do not count.

Each task's reward reads its reference from the conversation the prompt came from, so the same
function grades RL rollouts and the RL evaluation's pass@k. `REWARDS` maps task names to them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from nanochat.chat_format import reply_parts, stop_ids
from nanochat.tasks.gsm8k import extract_answer
from nanochat.tokenizer import Tokenizer


@dataclass(frozen=True)
class Reply:
    """A sampled reply as a reward reads it."""

    parts: tuple[dict, ...]
    """The assistant message its tokens make (`chat_format.reply_parts`): text, python, python_output."""
    finished: bool
    """It ended with a stop token (<|assistant_end|>) within its budget."""

    @classmethod
    def of(cls, tok: Tokenizer, tokens: list[int]) -> Reply:
        return cls(tuple(reply_parts(tok, tokens)), any(t in stop_ids(tok) for t in tokens))

    @property
    def text(self) -> str:
        """What the assistant wrote itself: its text parts, without tool calls or their outputs."""
        return "".join(p["text"] for p in self.parts if p["type"] == "text")


# A number as people write it: an optional sign, digits with thousands commas, a decimal part.
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![\w.])-?\d+(?:\.\d+)?(?!\d)")
_SPELLED = re.compile(r"\b[a-z](?:-[a-z])+\b")
# A sentence ends at . ! ? (a period not followed by a digit: not a decimal point) or a line break.
_SENTENCE_END = re.compile(r"[.!?](?!\d)|\n")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _final(text: str, answer: re.Pattern) -> str | None:
    """The last match of `answer` in `text`, provided its sentence holds no other match."""
    found = list(answer.finditer(text))
    if not found:
        return None
    last = found[-1]
    starts = [m.end() for m in _SENTENCE_END.finditer(text, 0, last.start())]
    sentence_start = starts[-1] if starts else 0
    if any(m.start() >= sentence_start for m in found[:-1]):
        return None  # "12 or 13": two candidates in the final sentence
    return last.group()


def final_number(text: str) -> float | None:
    """The reply's final stated number (see the module docstring), or None."""
    found = _final(text, _NUMBER)
    return None if found is None else _number(found)


def gsm8k_answer(text: str) -> float | None:
    """The number after a reply's last '####', GSM8K's convention for the final answer. Commas and
    a currency sign or unit around it are fine ("#### $1,200 dollars"); two numbers after it, or
    none, are no answer."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].split("\n", 1)[0]
    numbers = _NUMBER.findall(tail)
    return _number(numbers[0]) if len(numbers) == 1 else None


def reward_gsm8k(reply: Reply, conversation: dict) -> float:
    expected = extract_answer(_reference(conversation))
    got = gsm8k_answer(reply.text) if reply.finished else None
    return float(got is not None and expected is not None and got == _number(expected))


def reward_arithmetic(reply: Reply, conversation: dict) -> float:
    expected = final_number(_reference(conversation))
    got = final_number(reply.text) if reply.finished else None
    return float(got is not None and got == expected)


_SPELLING_ANSWER = re.compile(f"{_SPELLED.pattern}|{_NUMBER.pattern}")


def reward_spelling(reply: Reply, conversation: dict) -> float:
    """The last spelled-out word ("c-a-t") or count, exactly as the reference's."""
    expected = _final(_reference(conversation), _SPELLING_ANSWER)
    got = _final(reply.text, _SPELLING_ANSWER) if reply.finished else None
    return float(got is not None and got.replace(",", "") == expected)


def _reference(conversation: dict) -> str:
    """The text of the conversation's last (assistant) message: the reference answer."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


REWARDS: dict[str, Callable[[Reply, dict], float]] = {
    "gsm8k": reward_gsm8k,
    "arithmetic": reward_arithmetic,
    "spelling": reward_spelling,
}
