"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, each with unit tests.

Published file: openai_humaneval/test-00000-of-00001.parquet, columns task_id, prompt (the
signature and docstring), canonical_solution (the body), test (a `check(candidate)` function)
and entry_point (the function's name). A test set only: there is no train split.

Each conversation asks for the function in the user message and answers with the canonical
solution, as a fenced whole function; it carries the problem row as `problem`, which is what the
chat evaluation runs a reply against (evaluate/chat.py: score_humaneval).
"""

from __future__ import annotations

from nanochat.tasks.base import Task, check_held_out
from nanochat.tasks.hub import fetch, read_parquet

REPO_ID = "openai/openai_humaneval"
FILES = ("openai_humaneval/test-00000-of-00001.parquet",)
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def conversation(problem: dict) -> dict:
    solution = (problem["prompt"] + problem["canonical_solution"]).rstrip("\n")
    return {"messages": [{"role": "user", "content": f"Complete this Python function.\n\n```python\n"
                                                     f"{problem['prompt']}```"},
                         {"role": "assistant", "content": f"```python\n{solution}\n```"}],
            "problem": dict(problem)}


class HumanEval(Task):
    name = "humaneval"

    def __init__(self, split: str = "test", seed: int = 0):
        self.split, self.seed = check_held_out(self.name, split), seed
        self._problems = read_parquet(fetch(self.name, REPO_ID, FILES), FIELDS).to_pylist()

    def __len__(self) -> int:
        return len(self._problems)

    def _get(self, i: int) -> dict:
        return conversation(self._problems[i])
