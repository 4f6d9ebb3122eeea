"""Run under torchrun by test_runtime.py: each rank joins the gloo group through init_runtime,
all-reduces its rank, and writes what it saw to <out>/rank<r>.json."""

import json
import sys

import torch
import torch.distributed as dist

from nanochat.runtime import init_runtime, teardown

rt = init_runtime(device="cpu", seed=1234)
x = torch.tensor([float(rt.rank + 1)])
dist.all_reduce(x)
record = {"rank": rt.rank, "world_size": rt.world_size, "sum": x.item(), "backend": dist.get_backend(),
          "draw": torch.rand(1).item()}
with open(f"{sys.argv[1]}/rank{rt.rank}.json", "w") as f:
    json.dump(record, f)
teardown()
