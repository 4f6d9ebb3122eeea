"""One RL step's fixed rollouts, shared by test_rl.py and the torchrun worker (which imports only
this, not the test module and everything it pulls in)."""

import torch
from _tiny_model import VOCAB

from nanochat.train.rl import group_advantages


def fixed_step():
    """8 completions of 2 questions (4 each): random tokens, some forced, advantages from random rewards."""
    g = torch.Generator().manual_seed(5)
    prompts, rollouts = [], []
    for q in range(2):
        prompt = torch.randint(0, VOCAB, (3 + q,), generator=g).tolist()
        for _ in range(4):
            n = int(torch.randint(3, 9, (1,), generator=g))
            tokens = torch.randint(0, VOCAB, (n,), generator=g).tolist()
            chosen = (torch.rand(n, generator=g) > 0.25).tolist()
            prompts.append(prompt)
            rollouts.append((tokens, chosen))
    rewards = (torch.rand(2, 4, generator=g) > 0.5).float()
    rewards[0, 0], rewards[0, 1] = 1.0, 0.0  # at least one group with something to learn
    return prompts, rollouts, group_advantages(rewards).view(-1).tolist()
