"""GSM8K: grade-school math word problems with worked solutions (openai/gsm8k, config "main").

Published files: main/train-00000-of-00001.parquet (7473 rows) and main/test-00000-of-00001.parquet
(1319 rows), columns `question` and `answer` (strings). A solution marks each calculation as
`<<48/2=24>>` and ends with a line `#### 72`. Each mark becomes a calculator call: the
expression is a python part (learned) and its result a python_output part (forced), so the
model learns to call the tool in the middle of its reasoning. The result is what `calculate`
prints for the expression (what the tool will really answer), or the dataset's own when the
expression is not plain arithmetic. The final `#### 72` line is kept, so answers end with the
number and `extract_answer` finds it.
"""

from __future__ import annotations

import re

from nanochat.tasks.arithmetic import CalculatorError, calculate
from nanochat.tasks.base import Task, check_split
from nanochat.tasks.hub import fetch, read_parquet

REPO_ID = "openai/gsm8k"
FILES = {"train": ("main/train-00000-of-00001.parquet",), "test": ("main/test-00000-of-00001.parquet",)}
_CALL = re.compile(r"<<([^<>]*)>>")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def solution_parts(answer: str) -> list[dict]:
    """A GSM8K solution as assistant parts: text, then python + python_output for each <<...>>."""
    parts, position = [], 0
    for m in _CALL.finditer(answer):
        if answer[position:m.start()]:
            parts.append({"type": "text", "text": answer[position:m.start()]})
        expression, _, result = m.group(1).rpartition("=")
        if expression:
            try:
                result = calculate(expression)
            except CalculatorError:
                pass
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        position = m.end()
    if answer[position:]:
        parts.append({"type": "text", "text": answer[position:]})
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the last '####' (commas removed), or None."""
    found = _FINAL.findall(text)
    return found[-1].replace(",", "") if found else None


class GSM8K(Task):
    name = "gsm8k"

    def __init__(self, split: str = "train", seed: int = 0):
        self.split, self.seed = check_split(split, held_out="test"), seed
        table = read_parquet(fetch(self.name, REPO_ID, FILES[self.split]), ["question", "answer"])
        self._questions, self._answers = table.column("question"), table.column("answer")

    def __len__(self) -> int:
        return len(self._questions)

    def _get(self, i: int) -> dict:
        return {"messages": [
            {"role": "user", "content": self._questions[i].as_py()},
            {"role": "assistant", "content": solution_parts(self._answers[i].as_py())},
        ]}
