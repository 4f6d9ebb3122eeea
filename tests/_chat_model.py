"""A small chat model on disk, the way a finished run leaves it: a tokenizer in
NANOCHAT_HOME/tokenizers/<name> and an (untrained) GPT saved as the run's SFT checkpoint.
What it says is noise, but every path a user's model takes — loading, the engine, the chat CLI,
the server — runs for real."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.config import ModelConfig, tokenizer_dir
from nanochat.gpt import GPT, SlotCache
from nanochat.runs import stage_dir, tokenizer_identity
from nanochat.tokenizer import Tokenizer

TEXT = "Hello there! The cat sat on the mat. 2+3 is 5. Café, naïve, über — 日本語. " * 40


def make_chat_model(run: str = "t", tokenizer: str = "t", stage: str = "sft", seed: int = 0,
                    sequence_len: int = 128) -> Path:
    """Write the model into the current NANOCHAT_HOME (set it first); returns the checkpoint dir."""
    tok = Tokenizer.train([TEXT], 300)
    tok.save(tokenizer_dir(tokenizer))
    shape = ModelConfig(depth=2, aspect_ratio=32, head_dim=16, sequence_len=sequence_len)
    torch.manual_seed(seed)
    model = GPT(shape, tok.vocab_size)
    meta = {"config": {"model": dataclasses.asdict(shape)}, "tokenizer": tokenizer_identity(tokenizer, tok),
            "final": True}
    return save_checkpoint(stage_dir(run, stage), 1, model, meta)


def chat_model_home(tmp_path_factory) -> Path:
    """A fresh NANOCHAT_HOME holding run "t" with tokenizer "t" (for module-scoped fixtures, which
    cannot use monkeypatch): set NANOCHAT_HOME to it in the test."""
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_HOME", str(path))
        make_chat_model(run="t", tokenizer="t")
    return path


def scripted_slot_cache(slots: int, max_len: int, dtype: torch.dtype | None = None) -> SlotCache:
    """`new_slot_cache` of a scripted stand-in model: a real SlotCache (it schedules the passes
    ContinuousBatch runs) with one layer and head of width 2, since the script needs no keys or values."""
    return SlotCache(1, slots, 1, max_len, 2)


def new_prompts(idx: torch.Tensor, kv_cache) -> list[list[int]]:
    """The prompts whose prefill starts in this forward pass of a stand-in model: with a
    SlotCache, each scheduled row that starts at position 0; without a cache (Engine.generate over
    a stand-in), every row of a pass of more than one token."""
    if not isinstance(kv_cache, SlotCache):
        return [row.tolist() for row in idx] if idx.size(1) > 1 else []
    plan = kv_cache.plan
    if plan.first is None:  # one token a row
        return [[token] for token, p in zip(idx[0].tolist(), plan.positions.tolist(), strict=True) if p == 0]
    starts = (plan.first & (plan.positions == 0)).nonzero()[:, 0].tolist()
    ends = (plan.last + 1).tolist()
    return [idx[0, s:min(e for e in ends if e > s)].tolist() for s in starts]
