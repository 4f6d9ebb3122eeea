"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk, about 460k train and 24k test).

Published files: data/train-0000{0..3}-of-00004.parquet and data/test-00000-of-00001.parquet,
with a column `messages`: list<struct<content: string, role: string>>, roles "system" (optional,
first), then "user" and "assistant" alternating. Rows are converted as they are read, so the
table stays in Arrow memory rather than as Python objects.
"""

from __future__ import annotations

from nanochat.tasks.base import Task, TaskError, check_split
from nanochat.tasks.hub import fetch, read_parquet

REPO_ID = "HuggingFaceTB/smol-smoltalk"
FILES = {"train": tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
         "test": ("data/test-00000-of-00001.parquet",)}


def to_conversation(messages: list[dict], where: str = "conversation") -> dict:
    """SmolTalk messages -> our format: keep a leading system message, check that user and
    assistant alternate, and drop a final unanswered user message."""
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    body = out[1:] if out and out[0]["role"] == "system" else out
    if body and len(body) % 2 == 1 and body[-1]["role"] == "user":
        body = body[:-1]
    roles = [m["role"] for m in body]
    if not body or roles != ["user", "assistant"] * (len(body) // 2) \
            or not all(isinstance(m["content"], str) for m in out):
        roles = [m["role"] for m in out]
        raise TaskError(f"{where} is not a (system), user, assistant, ... conversation: roles {roles}")
    return {"messages": out[:1] + body if out[0]["role"] == "system" else body}


class SmolTalk(Task):
    name = "smoltalk"

    def __init__(self, split: str = "train", seed: int = 0):
        self.split, self.seed = check_split(split, held_out="test"), seed
        self._messages = read_parquet(fetch(self.name, REPO_ID, FILES[self.split]), ["messages"]).column("messages")

    def __len__(self) -> int:
        return len(self._messages)

    def _get(self, i: int) -> dict:
        return to_conversation(self._messages[i].as_py(), f"smoltalk {self.split} row {i}")
