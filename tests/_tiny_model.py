"""A few-thousand-parameter GPT for optimizer and loop tests."""

import torch

from nanochat.config import ModelConfig
from nanochat.gpt import GPT

VOCAB = 64
SEQ = 16


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    shape = dict(depth=2, aspect_ratio=32, head_dim=16, sequence_len=SEQ)
    shape.update(overrides)
    return GPT(ModelConfig(**shape), VOCAB)


def fixed_rows(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]
