"""Run under torchrun by test_data_loader.py: each rank loads 3 batches of its share of the rows
and saves them to <out>/rank<r>.pt."""

import sys

import torch

from nanochat.data.loader import DataLoader
from nanochat.data.sources import folder_source
from nanochat.runtime import init_runtime, teardown

sys.path.insert(0, sys.argv[2])  # the tests folder, for the stand-in tokenizer
from _fake_tokenizer import ByteTokenizer  # noqa: E402

rt = init_runtime(device="cpu")
loader = DataLoader(folder_source(sys.argv[1]), ByteTokenizer(), batch_size=2, seq_len=32,
                    rank=rt.rank, world_size=rt.world_size, buffer_docs=8)
batches = [next(loader)[0] for _ in range(3)]
torch.save(batches, f"{sys.argv[1]}/rank{rt.rank}.pt")
loader.close()
teardown()
