"""Run under torchrun by test_rl.py: one RL step (fixed rollouts, sharded optimizer) where each of
the W ranks takes every W-th completion; rank 0 saves the weights to <out>/rl.pt."""

import sys

import torch

sys.path.insert(0, sys.argv[2])
from _rl_step import fixed_step  # noqa: E402
from _tiny_model import tiny_gpt  # noqa: E402

from nanochat.config import OptimConfig  # noqa: E402
from nanochat.optim import build_optimizer  # noqa: E402
from nanochat.runtime import init_runtime, teardown  # noqa: E402
from nanochat.train.loop import broadcast_weights, train_step  # noqa: E402
from nanochat.train.rl import rollout_rows  # noqa: E402

rt = init_runtime(device="cpu", dtype="float32")
model = tiny_gpt(seed=rt.rank)
broadcast_weights(model)
opt = build_optimizer(model, OptimConfig(), total_batch_tokens=8 * 16)
prompts, rollouts, advantages = fixed_step()
W, r = rt.world_size, rt.rank
batch = rollout_rows(prompts[r::W], rollouts[r::W], advantages[r::W], rt.device)
train_step(model, opt, iter([batch]), accum_steps=1, rt=rt)
if rt.rank == 0:
    torch.save(model.state_dict(), f"{sys.argv[1]}/rl.pt")
teardown()
