"""Chat batches: conversations rendered in the chat format, cut into (x, y) rows for the chat stages.

The chat stages' counterpart of `loader.DataLoader`. Each conversation becomes a (2, n) array of
token ids and a 1 wherever the assistant writes; y is -1 everywhere else, so the loss covers only
the assistant's words (and its closing <|assistant_end|>).

  packed (midtraining)  conversations concatenated into one stream and cut into full rows:
                        no padding, and the model sees the special tokens at every position
  padded (SFT)          one conversation per row, padded to the longest of the batch, as a
                        conversation looks at inference time
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nanochat.chat_format import render_conversation
from nanochat.tokenizer import Tokenizer


def render_conversations(conversations: Sequence[dict], tok: Tokenizer, max_tokens: int) -> list[np.ndarray]:
    """Every conversation as a (2, n ≤ max_tokens) array: token ids, and 1 where the assistant writes."""
    out = []
    for conversation in conversations:
        ids, mask = render_conversation(tok, conversation["messages"], max_tokens=max_tokens)
        out.append(np.array([ids, mask], dtype=np.int64))
    return out


class ChatBatches:
    """Deterministic (x, y) batches of rendered conversations for one rank; y is -1 where the
    assistant does not write (and on padding). `packed`: conversations concatenated and cut into
    full rows (midtraining); else one conversation per row, padded (SFT). Global row i goes to
    rank i % world_size, so the step's rows do not depend on the number of ranks."""

    def __init__(self, conversations: list[np.ndarray], batch_size: int, seq_len: int, packed: bool,
                 device: torch.device, rank: int = 0, world_size: int = 1):
        self.batch_size, self.device, self.rank, self.world_size = batch_size, device, rank, world_size
        if packed:
            stream = np.concatenate(conversations, axis=1)
            n_rows = stream.shape[1] // (seq_len + 1)
            self.rows = [stream[:, i * (seq_len + 1):(i + 1) * (seq_len + 1)] for i in range(n_rows)]
        else:
            self.rows = conversations
        self.next_row = 0

    def __len__(self) -> int:
        """Whole batches left in one pass, for this rank."""
        return (len(self.rows) - self.next_row) // (self.batch_size * self.world_size)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self) == 0:
            raise StopIteration
        start = self.next_row + self.rank
        mine = self.rows[start:start + self.batch_size * self.world_size:self.world_size]
        self.next_row += self.batch_size * self.world_size
        width = max(r.shape[1] for r in mine)
        ids = np.zeros((len(mine), width), dtype=np.int64)
        learn = np.zeros((len(mine), width), dtype=bool)
        for b, row in enumerate(mine):
            ids[b, :row.shape[1]] = row[0]
            learn[b, :row.shape[1]] = row[1] == 1
        x = torch.from_numpy(ids[:, :-1])
        y = torch.from_numpy(np.where(learn[:, 1:], ids[:, 1:], -1))
        if self.device.type == "cuda":  # from page-locked memory the copies are asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"next_row": self.next_row}

    def load_state_dict(self, state: dict) -> None:
        self.next_row = state["next_row"]

    def close(self) -> None:
        """Nothing to release (the rows are in memory); here so the stage loop treats every batch source alike."""
