"""Bits per byte: the model's cross-entropy measured per byte of text rather than per token, so
models with different tokenizers (or vocabulary sizes) can be compared on the same text.

    bpb = Σ nll(token) / (ln 2 · Σ bytes(token))

over every target token that stands for text; special tokens (BOS, chat markers) are excluded
from both sums — they are not text, and predicting a document boundary is not compression.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from nanochat.gpt import eval_mode
from nanochat.runtime import Runtime


def token_byte_lengths(tokenizer, device: torch.device | str = "cpu") -> torch.Tensor:
    """UTF-8 byte length of every token id; 0 for special tokens."""
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    specials = set(tokenizer.special_tokens.values())
    for i in range(tokenizer.vocab_size):
        if i not in specials:
            lengths[i] = len(tokenizer.token_bytes(i))
    return lengths.to(device)


@torch.no_grad()
def evaluate_bpb(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                 rt: Runtime, max_batches: int | None = None) -> float:
    """Bits per byte over `batches` (all ranks' batches together under torchrun)."""
    nats = torch.zeros((), device=rt.device, dtype=torch.float64)
    n_bytes = torch.zeros((), device=rt.device, dtype=torch.int64)
    with eval_mode(model):
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            y_bytes = token_bytes[y.clamp(min=0)] * (y != -1)
            y = y.masked_fill(y_bytes == 0, -1)
            with rt.autocast():
                nats += model(x, y, loss_reduction="sum").double()
            n_bytes += y_bytes.sum()
    if dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(n_bytes)
    return nats.item() / (math.log(2) * max(n_bytes.item(), 1))
