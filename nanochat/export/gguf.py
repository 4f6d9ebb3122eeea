"""`nanochat export --format gguf`: for llama.cpp and Ollama, where an architecture llama.cpp knows
computes the model exactly; otherwise a refusal that names every reason.

llama.cpp runs a fixed set of architectures in C++, and its byte-level BPE tokenizers split text with
regexes compiled into it, chosen by name (`tokenizer.ggml.pre`). Two things stand between a nanochat
model and a GGUF file:
  - the architecture: the recipe's defaults (bigram hash embedding, smear, value embeddings, the
    logit soft-cap) exist in no llama.cpp architecture; a model without them is a Qwen3 (QK-norm)
    or a Llama, exactly as for transformers (`export/hf.py`);
  - the split pattern: llama.cpp cuts text with regexes compiled into it, picked by name. Matching
    our pattern to one of those names is not built, and a wrong match would give other ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from nanochat.errors import NanochatError
from nanochat.export.hf import unmapped_parts
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer


def gguf_obstacles(model: GPT, tok: Tokenizer) -> list[str]:
    """Why llama.cpp could not run this model with our outputs and ids (empty: nothing found)."""
    arch = "qwen3" if model.config.qk_norm else "llama"
    reasons = [f"the architecture: llama.cpp's {arch} has no {part}" for part in unmapped_parts(model.config, arch)]
    reasons.append(f"the tokenizer: llama.cpp splits text with pre-tokenizers compiled into it, picked by name, "
                   f"and this export cannot yet match the split pattern {tok.pattern!r} to one of them")
    return reasons


def export_gguf(model: GPT, tok: Tokenizer, out: Path) -> NoReturn:
    """Refuses, naming every reason (see the module docstring): the tokenizer's is always among them
    until pattern matching is built, so no GGUF writer is here yet."""
    reasons = gguf_obstacles(model, tok)
    raise NanochatError("cannot export this model to GGUF without changing what it computes:\n  - "
                        + "\n  - ".join(reasons)
                        + "\nExport it for transformers instead (`nanochat export --format hf`), which runs it "
                          "exactly.")
