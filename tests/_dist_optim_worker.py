"""Run under torchrun by test_optim.py: DDP training of the tiny GPT on a fixed global batch,
each rank taking its rows; rank 0 saves the final weights to <out>/ddp.pt."""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, sys.argv[2])
from _tiny_model import fixed_rows, tiny_gpt  # noqa: E402

from nanochat.config import OptimConfig  # noqa: E402
from nanochat.optim import build_optimizer  # noqa: E402
from nanochat.runtime import init_runtime, teardown  # noqa: E402
from nanochat.train.loop import train_step  # noqa: E402

rt = init_runtime(device="cpu", dtype="float32")  # compared within fp32 tolerance
model = tiny_gpt()
opt = build_optimizer(model, OptimConfig(), total_batch_tokens=4 * 16)
for group in opt.optimizers[0].param_groups:
    group["ns_dtype"] = "float32"
ddp = DDP(model)
for step in range(3):
    x, y = fixed_rows(4, seed=step)
    mine = iter([(x[rt.rank::2], y[rt.rank::2])])
    train_step(ddp, opt, mine, accum_steps=1, rt=rt)
if rt.rank == 0:
    torch.save(model.state_dict(), f"{sys.argv[1]}/ddp.pt")
teardown()
