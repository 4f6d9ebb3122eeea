"""MMLU auxiliary train: about 100k multiple-choice questions (cais/mmlu, config "auxiliary_train").

Published file: auxiliary_train/train-00000-of-00001.parquet. Its rows are nested one level: a
single column `train` of struct<answer: int64, choices: list<string>, question: string,
subject: string> (subject is often empty). Flat columns with those names (as in the "all"
config's file) are read as well. The user sees the question and lettered choices; the assistant
answers with the letter alone, which is also how a chat evaluation scores it. There is no
published held-out part of this file, so 1% of questions, by hash, form the "val" split.
"""

from __future__ import annotations

import pyarrow as pa

from nanochat.tasks.base import Task, TaskError, check_split, in_held_out
from nanochat.tasks.hub import fetch, read_parquet

REPO_ID = "cais/mmlu"
FILES = ("auxiliary_train/train-00000-of-00001.parquet",)
LETTERS = "ABCDEFGHIJ"
VAL_PERCENT = 1
FIELDS = ("question", "choices", "answer")


def multiple_choice(question: str, choices: list[str], answer: int, subject: str = "") -> dict:
    if not 0 <= answer < len(choices) <= len(LETTERS):
        raise TaskError(f"MMLU row with {len(choices)} choices has answer index {answer}")
    topic = f" about {subject.replace('_', ' ')}" if subject else ""
    lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS[:len(choices)], choices, strict=True))
    prompt = (f"Here is a multiple-choice question{topic}.\n\n{question.strip()}\n\n{lines}\n\n"
              f"Answer with the letter of the correct choice.")
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": LETTERS[answer]}]}


def _flat(table: pa.Table) -> pa.Table:
    """The nested auxiliary_train layout (one struct column `train`) -> flat columns."""
    if "train" in table.column_names and pa.types.is_struct(table.schema.field("train").type):
        table = table.select(["train"]).flatten()
        table = table.rename_columns([c.removeprefix("train.") for c in table.column_names])
    missing = [f for f in FIELDS if f not in table.column_names]
    if missing:
        raise TaskError(f"the MMLU file has no column(s) {missing} (columns: {table.column_names}); delete it "
                        f"and run again to download it afresh")
    return table


class MMLU(Task):
    name = "mmlu"

    def __init__(self, split: str = "train", seed: int = 0):
        self.split, self.seed = check_split(split), seed
        table = _flat(read_parquet(fetch(self.name, REPO_ID, FILES)))
        self._rows = table
        held_out = self.split != "train"
        self._index = [i for i, q in enumerate(table.column("question").to_pylist())
                       if in_held_out(q, VAL_PERCENT) == held_out]

    def __len__(self) -> int:
        return len(self._index)

    def _get(self, i: int) -> dict:
        row = {name: self._rows.column(name)[self._index[i]].as_py() for name in self._rows.column_names}
        return multiple_choice(row["question"], row["choices"], row["answer"], row.get("subject") or "")
