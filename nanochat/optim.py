"""Muon for the hidden 2-D matrices, AdamW for everything else, stepped as one optimizer.

Muon (Jordan et al., 2024) takes the Nesterov momentum of a weight matrix's gradient and
replaces it by the nearest semi-orthogonal matrix (all singular values 1), computed by a few
steps of a matrix polynomial iteration in bf16. Every direction of the update then moves the
weights by the same amount, which lets hidden matrices train with a much larger learning rate.
It only makes sense for matrices that act as linear maps on hidden states, so the token
embedding (a lookup table), the output head and all vectors keep AdamW.

Learning-rate rules (documented in the README): AdamW rates scale with width as
(n_embd / 768)^-0.5 (wider models want smaller steps per parameter), and every rate scales with
the square root of the batch size relative to the batch the rates were tuned for
(`reference_batch_tokens`: 2^19 for the GPU presets, 8192 for `tiny`), since larger batches
average away gradient noise and can take proportionally longer steps.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from nanochat.config import OptimConfig

# Per-iteration coefficients (a, b, c) of the odd quintic X <- aX + b(XX^T)X + c(XX^T)^2 X, from
# "The Polar Express" (Amsel, Persson, Musco & Gower, 2025): each step is the minimax-optimal
# polynomial for the interval of singular values left by the previous one, so 5 steps in bf16
# bring singular values from [1e-3, 1] to about [0.85, 1.15]; further steps repeat the last one.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
REFERENCE_WIDTH = 768
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "mps")  # where torch.optim.AdamW(fused=True) has a kernel


@torch.no_grad()
def orthogonalize(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T (a batch of matrices in the last two dims)."""
    X = G.to(dtype)
    wide = X.size(-2) <= X.size(-1)
    if not wide:  # iterate on the smaller Gram matrix X X^T
        X = X.mT
    # Scale so every singular value is at most 1 (the Frobenius norm bounds the spectral norm);
    # the 1% margin keeps bf16 rounding from pushing one above the interval the polynomials expect.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised updates for 2-D parameters.

    update = orthogonalize(nesterov_momentum(grad)) * sqrt(max(1, rows / cols)); the shape factor
    gives tall matrices (whose orthogonal updates have smaller entries) the same per-entry RMS as
    square ones. Weight decay is decoupled and scaled by the learning rate, as in AdamW.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: str = "bfloat16", cautious_wd: bool = False,
                 normuon: bool = False, beta2: float = 0.95):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, cautious_wd=cautious_wd, normuon=normuon, beta2=beta2)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon handles 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Matrices of one shape are orthogonalised together, as one batched matmul chain.
            by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            for shape, params in by_shape.items():
                grads = []
                for p in params:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    grads.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
                updates = orthogonalize(torch.stack(grads), group["ns_steps"], getattr(torch, group["ns_dtype"]))
                scale = math.sqrt(max(1.0, shape[0] / shape[1]))
                for p, u in zip(params, updates, strict=True):
                    u = u.to(p.dtype)
                    if group["normuon"]:
                        u = self._normalise_rows(p, u, group["beta2"])
                    if group["weight_decay"] and group["cautious_wd"]:
                        p.sub_(p * (u * p > 0), alpha=group["lr"] * group["weight_decay"])
                    elif group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(u, alpha=-group["lr"] * scale)
        return loss

    def _normalise_rows(self, p: torch.Tensor, u: torch.Tensor, beta2: float) -> torch.Tensor:
        """u divided per row by the root of a running mean of its squared entries, rescaled to u's norm."""
        v = self.state[p].setdefault("row_second_moment", torch.zeros(u.size(0), 1, dtype=u.dtype, device=u.device))
        v.lerp_(u.square().mean(dim=1, keepdim=True), 1 - beta2)
        normed = u / (v.sqrt() + 1e-10)
        return normed * (u.norm() / normed.norm().clamp(min=1e-10))


class HybridOptimizer:
    """Several torch optimizers stepped as one: what the training loop and checkpoints see."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("optimizer state does not match this optimizer's structure")
        for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)


def param_groups(model: nn.Module, muon_embeddings: bool = False) -> dict[str, list[nn.Parameter]]:
    """Split a GPT's parameters: `matrix` (2-D weights inside the blocks, plus the token embedding
    when `muon_embeddings`), `embedding` (token, value and bigram embeddings: lookups, not matmuls),
    `unembedding` (the head) and `scalar` (every 1-D tensor)."""
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embedding": [], "unembedding": [], "scalar": []}
    seen: set[int] = set()
    embedding = model.wte.weight
    lookups = {id(w) for w in model.lookup_tables()} - {id(embedding)}  # value and bigram embeddings
    head = model.lm_head.weight
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is embedding:
            groups["matrix" if muon_embeddings else "embedding"].append(p)
        elif id(p) in lookups:
            groups["embedding"].append(p)
        elif p is head:
            groups["unembedding"].append(p)
        elif p.ndim < 2:
            groups["scalar"].append(p)
        elif p.ndim == 2:
            groups["matrix"].append(p)
        else:
            raise ValueError(f"no optimizer group for a parameter of shape {tuple(p.shape)}")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_batch_tokens: int) -> HybridOptimizer:
    width_scale = (model.config.n_embd / REFERENCE_WIDTH) ** -0.5
    batch_scale = (total_batch_tokens / cfg.reference_batch_tokens) ** 0.5
    groups = param_groups(model, cfg.muon_embeddings)
    adam_lrs = {"embedding": cfg.embedding_lr, "unembedding": cfg.unembedding_lr, "scalar": cfg.scalar_lr}
    if cfg.optimizer == "adamw":
        adam_lrs["matrix"] = cfg.adamw_matrix_lr
    adam_groups = [
        {"params": groups[name], "lr": lr * width_scale * batch_scale, "name": name}
        for name, lr in adam_lrs.items() if groups[name]
    ]
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    # The fused kernel is one pass over every tensor: on the tiny preset's 10M embedding rows it steps
    # in 5 ms on the CPU against 41 ms for the default multi-tensor path.
    fused = device.type in FUSED_ADAMW_DEVICES
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=fused)
    ]
    if cfg.optimizer == "muon" and groups["matrix"]:
        # bf16 matmuls are the fast path on GPUs; CPUs without bf16 units emulate them ~20x slower.
        ns_dtype = "bfloat16" if on_cuda else "float32"
        optimizers.insert(0, Muon([{"params": groups["matrix"], "name": "matrix"}],
                                  lr=cfg.matrix_lr * batch_scale, momentum=cfg.muon_momentum,
                                  weight_decay=cfg.weight_decay, ns_dtype=ns_dtype,
                                  cautious_wd=cfg.cautious_weight_decay, normuon=cfg.normuon))
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["base_lr"] = group["lr"]
    return HybridOptimizer(optimizers)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` over the last steps."""
    warmup = round(cfg.warmup_frac * total_steps)
    warmdown = round(cfg.warmdown_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / max(warmdown, 1)
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum(step: int, cfg: OptimConfig, lr_mult: float = 1.0) -> float:
    """Momentum warms up from 0.85 to its target over the first `muon_momentum_warmup` steps; with
    `muon_momentum_cooldown` the rise is scaled by the learning-rate multiplier, so momentum falls
    back towards 0.85 as the learning rate warms down."""
    frac = min(step / max(cfg.muon_momentum_warmup, 1), 1.0)
    if cfg.muon_momentum_cooldown:
        frac *= lr_mult
    return (1 - frac) * 0.85 + frac * cfg.muon_momentum


def apply_schedule(optimizer: HybridOptimizer, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set every group's learning rate (and Muon's momentum) for `step`; returns the multiplier."""
    mult = lr_multiplier(step, total_steps, cfg)
    for opt in optimizer.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mult
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step, cfg, mult)
    return mult
