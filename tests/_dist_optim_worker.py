"""Run under torchrun by test_optim.py: training of the tiny GPT with the sharded optimizer on a
fixed global batch of 4 rows, each of the W ranks taking rows r, r + W, …; rank 0 saves the final
weights to <out>/sharded.pt, and every rank its optimizer state's size to <out>/state<rank>.pt."""

import sys

import torch

sys.path.insert(0, sys.argv[2])
from _tiny_model import fixed_rows, tiny_gpt  # noqa: E402

from nanochat.config import OptimConfig  # noqa: E402
from nanochat.optim import build_optimizer  # noqa: E402
from nanochat.runtime import init_runtime, teardown  # noqa: E402
from nanochat.train.loop import broadcast_weights, train_step  # noqa: E402

rt = init_runtime(device="cpu", dtype="float32")  # compared within fp32 tolerance
model = tiny_gpt(seed=rt.rank)  # different on every rank until the broadcast
broadcast_weights(model)
opt = build_optimizer(model, OptimConfig(), total_batch_tokens=4 * 16)
W = rt.world_size
for step in range(3):
    x, y = fixed_rows(4, seed=step)
    mine = iter([(x[rt.rank::W], y[rt.rank::W])])
    train_step(model, opt, mine, accum_steps=1, rt=rt)
state_bytes = sum(t.numel() * t.element_size() for o in opt.optimizers for s in o.state.values()
                  for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
torch.save(state_bytes, f"{sys.argv[1]}/state{rt.rank}.pt")
if rt.rank == 0:
    torch.save(model.state_dict(), f"{sys.argv[1]}/sharded.pt")
teardown()
