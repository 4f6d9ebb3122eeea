"""A small chat model on disk, the way a finished run leaves it: a tokenizer in
NANOCHAT_HOME/tokenizers/<name> and an (untrained) GPT saved as the run's SFT checkpoint.
What it says is noise, but every path a user's model takes — loading, the engine, the chat CLI,
the server — runs for real."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.config import ModelConfig, tokenizer_dir
from nanochat.gpt import GPT
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


def no_slot_cache(*_args, **_kwargs) -> types.SimpleNamespace:
    """`new_slot_cache` of a scripted stand-in model that needs no keys or values: what
    ContinuousBatch asks of a slot cache (`fill`, `active`), doing nothing."""
    return types.SimpleNamespace(fill=lambda *args: None, active=None)
