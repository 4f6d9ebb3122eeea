"""ARC, the AI2 Reasoning Challenge (allenai/ai2_arc): grade-school science questions with 3-5 choices.

Two tasks, one per published config: `arc_easy` (ARC-Easy: 2251 train, 2376 test questions) and
`arc_challenge` (ARC-Challenge, the questions that simple retrieval and co-occurrence methods got
wrong: 1119 train, 1172 test). Files <config>/{train,test}-00000-of-00001.parquet, columns
question, choices {text, label} and answerKey; the labels ("A".."E", or "1".."5" in some
questions) are shown as the letters A, B, ... of a `multiple_choice` conversation. The held-out
split is the published test set.
"""

from __future__ import annotations

from nanochat.tasks.base import TaskError, check_split
from nanochat.tasks.hub import fetch, read_parquet
from nanochat.tasks.multiple_choice import MultipleChoiceTask

REPO_ID = "allenai/ai2_arc"
FOLDER = "arc"  # both configs' files share one cache folder


class ARC(MultipleChoiceTask):
    """One published config of ARC; the subclasses below name it and the task."""

    config = ""

    def __init__(self, split: str = "train", seed: int = 0):
        self.split, self.seed = check_split(split, held_out="test"), seed
        filename = f"{self.config}/{self.split}-00000-of-00001.parquet"
        table = read_parquet(fetch(self.name, REPO_ID, [filename], folder=FOLDER), ["question", "choices", "answerKey"])
        self.rows = []
        for row in table.to_pylist():
            labels, texts = row["choices"]["label"], row["choices"]["text"]
            if row["answerKey"] not in labels:
                raise TaskError(f"ARC question {row['question'][:60]!r} has answer {row['answerKey']!r}, not one "
                                f"of its labels {labels}: delete the file and run again to download it afresh")
            self.rows.append((row["question"], texts, labels.index(row["answerKey"]), ""))


class ARCEasy(ARC):
    name, config = "arc_easy", "ARC-Easy"


class ARCChallenge(ARC):
    name, config = "arc_challenge", "ARC-Challenge"
