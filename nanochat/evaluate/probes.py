"""The quick checks the training stages run on their own model while it trains.

Pretraining: greedy continuations of a few fixed text prompts (next to validation bpb, in bpb.py).
Chat stages (midtraining, SFT): the loss on held-out conversations; the share of held-out prompts
the model answers with a closing <|assistant_end|>; the bits per byte of reference answers to
held-out Wikipedia questions (the base model measured alongside, as the yardstick); greedy chats
from fixed prompts. `nanochat eval` is the full evaluation; these are minutes-cheap by design.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from nanochat.chat_format import render_conversation, render_for_completion
from nanochat.engine import Engine, Sampling
from nanochat.gpt import GPT, eval_mode
from nanochat.runtime import Runtime
from nanochat.tasks.wiki import wiki_eval_items
from nanochat.tokenizer import Tokenizer

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "La capital de España es",
    "The opposite of hot is",
    "Le plus grand océan du monde est",
]
SAMPLE_CHATS = [
    "Hello! Who are you?",
    "What can you do?",
    "What is the capital of France?",
    "How many r are in the word strawberry?",
    "What is 23 times 17?",
]


def greedy_samples(model: GPT, tok: Tokenizer, prompts: list[str], rt: Runtime, max_tokens: int = 16) -> list[str]:
    """Greedy continuations of text prompts (after BOS), as prompt + continuation."""
    outs = Engine(model, tok, rt).complete([[tok.bos_id, *tok.encode(p)] for p in prompts], Sampling(max_tokens))
    return [p + tok.decode(o) for p, o in zip(prompts, outs, strict=True)]


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], rt: Runtime,
                    max_batches: int = 16) -> float:
    """Mean loss per supervised token on held-out conversations."""
    total = count = 0.0
    with eval_mode(model):
        for i, (x, y) in enumerate(batches):
            if i == max_batches:
                break
            with rt.autocast():
                total += model(x, y, loss_reduction="sum").item()
            count += (y != -1).sum().item()
    return total / max(count, 1)


def chat_replies(model: GPT, tok: Tokenizer, questions: list[str], rt: Runtime, max_new_tokens: int = 128,
                 temperature: float = 0.0, batch: int = 20) -> list[list[int]]:
    """Replies (token ids, ending with <|assistant_end|> when the model closed its turn), tool calls
    executed; greedy, or sampled from the top 50 tokens at `temperature` with a fixed seed."""
    engine = Engine(model, tok, rt)
    prompts = [render_for_completion(tok, [{"role": "user", "content": q}]) for q in questions]
    out = []
    for i in range(0, len(prompts), batch):
        out += engine.complete(prompts[i:i + batch], Sampling(max_new_tokens, temperature, top_k=50, seed=i))
    return out


def assistant_end_rate(model: GPT, tok: Tokenizer, questions: list[str], rt: Runtime) -> float:
    """Share of replies closed with <|assistant_end|> within 128 tokens, sampled as a chat would be
    (temperature 0.7, top 50): greedy decoding of a small model loops on a phrase, which measures
    the decoding rule rather than whether the model learned to end its turn."""
    end = tok.special_id("<|assistant_end|>")
    replies = chat_replies(model, tok, questions, rt, temperature=0.7)
    return sum(bool(r) and r[-1] == end for r in replies) / len(replies)


@torch.no_grad()
def answer_bpb(model: nn.Module, tok: Tokenizer, items: list[tuple[str, str]], rt: Runtime) -> float:
    """Bits per byte of reference answers given their questions, in the chat format."""
    nats = n_bytes = 0.0
    with eval_mode(model):
        for question, answer in items:
            ids, mask = render_conversation(tok, [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}])
            x = torch.tensor([ids[:-1]], device=rt.device)
            y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]], device=rt.device)
            y[0, -1] = -1  # <|assistant_end|> is not part of the answer's bytes
            with rt.autocast():
                nats += model(x, y, loss_reduction="sum").item()
            n_bytes += len(answer.encode())
    return nats / (math.log(2) * n_bytes)


def held_out_probes(n: int = 100, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """Held-out Wikipedia questions (from articles outside pretraining's train split) with answers."""
    items = wiki_eval_items(n, seed)
    return [q for q, _ in items], items


def sample_chats(model: GPT, tok: Tokenizer, rt: Runtime) -> list[dict]:
    """Greedy replies to SAMPLE_CHATS, as {"user", "assistant"} (the report card shows them)."""
    replies = chat_replies(model, tok, SAMPLE_CHATS, rt)
    return [{"user": q, "assistant": tok.decode(r)} for q, r in zip(SAMPLE_CHATS, replies, strict=True)]
