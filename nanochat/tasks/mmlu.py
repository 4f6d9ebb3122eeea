"""MMLU (cais/mmlu): the auxiliary train set for training, the test set for evaluation.

`mmlu` is the auxiliary train: about 100k multiple-choice questions (config "auxiliary_train",
file auxiliary_train/train-00000-of-00001.parquet). Its rows are nested one level: a single
column `train` of struct<answer: int64, choices: list<string>, question: string, subject:
string> (subject is often empty). Flat columns with those names (as in the "all" config's file)
are read as well. There is no published held-out part of this file, so 1% of questions, by
hash, form its "val" split.

`mmlu_test` is MMLU proper: the 14,042 test questions of all 57 subjects (config "all", file
all/test-00000-of-00001.parquet, flat columns question, subject, choices, answer), in the file's
order, which is sorted by subject. It has no train split.

Both render as `multiple_choice` conversations: the question and lettered choices, answered with
the letter alone.
"""

from __future__ import annotations

import pyarrow as pa

from nanochat.tasks.base import Task, TaskError, check_held_out, check_split, in_held_out
from nanochat.tasks.hub import fetch, read_parquet
from nanochat.tasks.multiple_choice import MultipleChoiceTask, multiple_choice

REPO_ID = "cais/mmlu"
FILES = ("auxiliary_train/train-00000-of-00001.parquet",)
TEST_FILES = ("all/test-00000-of-00001.parquet",)
VAL_PERCENT = 1
FIELDS = ("question", "choices", "answer")


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
    """The auxiliary train set (see the module docstring)."""

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


class MMLUTest(MultipleChoiceTask):
    """The test set, all subjects (see the module docstring); its files share the mmlu folder."""

    name = "mmlu_test"

    def __init__(self, split: str = "test", seed: int = 0):
        self.split, self.seed = check_held_out(self.name, split), seed
        table = read_parquet(fetch(self.name, REPO_ID, TEST_FILES, folder="mmlu"),
                             ["question", "subject", "choices", "answer"])
        self.rows = [(r["question"], r["choices"], r["answer"], r["subject"] or "") for r in table.to_pylist()]
