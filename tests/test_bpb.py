"""Bits per byte on a toy case worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanochat.evaluate.bpb import evaluate_bpb, token_byte_lengths
from nanochat.runtime import Runtime

CPU = Runtime(torch.device("cpu"), None)


class ToyTokenizer:
    """Ids 0, 1, 2 are the texts "a", "b", "cd"; id 3 is the special token <|bos|>."""
    vocab_size = 4
    special_tokens = {"<|bos|>": 3}

    def token_bytes(self, i):
        return [b"a", b"b", b"cd"][i]


class FixedModel(nn.Module):
    """Predicts p = (1/2, 1/4, 1/8, 1/8) whatever the input: a target costs 1, 2, 3 or 3 bits.
    The loss is computed as GPT.forward does (-1 = no target)."""

    def __init__(self):
        super().__init__()
        self.log_p = nn.Parameter(torch.log(torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 8])))
        self.seen_targets = []

    def forward(self, idx, targets, loss_reduction="mean"):
        self.seen_targets.append(targets.clone())
        logits = self.log_p.expand(*idx.shape, 4)
        return F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)


BATCHES = [
    # targets 0, 1, 2 -> 1 + 2 + 3 = 6 bits over 1 + 1 + 2 = 4 bytes; the BOS target (3 bits) is not text
    (torch.tensor([[3, 0, 1, 2]]), torch.tensor([[0, 1, 2, 3]])),
    # targets 2, 2, 0 -> 3 + 3 + 1 = 7 bits over 2 + 2 + 1 = 5 bytes; -1 is no target at all
    (torch.tensor([[3, 2, 2, 0]]), torch.tensor([[2, 2, 0, -1]])),
]


def test_token_byte_lengths():
    assert token_byte_lengths(ToyTokenizer()).tolist() == [1, 1, 2, 0]


def test_bpb_by_hand():
    model = FixedModel()
    bpb = evaluate_bpb(model, BATCHES, token_byte_lengths(ToyTokenizer()), CPU)
    assert bpb == pytest.approx(13 / 9)  # (6 + 7) bits / (4 + 5) bytes; with the BOS target it would be 16 / 9
    assert model.seen_targets[0].tolist() == [[0, 1, 2, -1]]  # special target masked out before the model
    assert model.training  # restored


def test_bpb_max_batches_and_no_text():
    lengths = token_byte_lengths(ToyTokenizer())
    assert evaluate_bpb(FixedModel(), BATCHES, lengths, CPU, max_batches=1) == pytest.approx(6 / 4)
    # Only special targets: no bytes, no bits, and no division by zero.
    only_bos = [(torch.tensor([[0, 1]]), torch.tensor([[3, 3]]))]
    assert evaluate_bpb(FixedModel(), only_bos, lengths, CPU) == 0.0


def test_bpb_is_nats_over_ln2_bytes():
    """Uniform predictions over 4 tokens cost 2 bits each, whatever the token."""
    model = FixedModel()
    with torch.no_grad():
        model.log_p.fill_(-math.log(4))
    bpb = evaluate_bpb(model, BATCHES, token_byte_lengths(ToyTokenizer()), CPU)
    assert bpb == pytest.approx(2 * 6 / 9)
