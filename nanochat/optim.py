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
import torch.distributed as dist
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

    Sharded over `world_size` ranks (the model is then not wrapped in DDP: each rank holds its own
    gradients of its own rows): the matrices of one shape are stacked and split into `world_size`
    equal slices, padded with zero matrices. The stacked gradients are reduce-scattered (summed), so
    rank r receives the summed gradients of slice r alone; it keeps momentum for those matrices
    only, orthogonalises them and updates them; the updated slices are all-gathered into every
    rank's weights. The next shape's gradients travel while this one's are orthogonalised. Each
    matrix gets exactly the update one process would give it (tests/test_optim.py, 2 and 4 ranks).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: str = "bfloat16", cautious_wd: bool = False,
                 normuon: bool = False, beta2: float = 0.95, world_size: int = 1, rank: int = 0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, cautious_wd=cautious_wd, normuon=normuon, beta2=beta2)
        super().__init__(params, defaults)
        self.world_size, self.rank = world_size, rank
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
        # Matrices of one shape are orthogonalised together, as one batched matmul chain.
        jobs = [(group, params) for group in self.param_groups for params in self._by_shape(group)]
        if self.world_size == 1:
            for group, params in jobs:
                self._update(group, params, [p.grad for p in params])
            return loss
        layouts = self._layouts([len(params) for _, params in jobs])
        gathers = []
        pending = self._reduce(jobs[0][1], layouts[0]) if jobs else None
        for i, (group, params) in enumerate(jobs):
            grads, _, handle = pending
            pending = self._reduce(jobs[i + 1][1], layouts[i + 1]) if i + 1 < len(jobs) else None
            handle.wait()
            mine = self._mine(layouts[i])
            self._update(group, [params[j] for j, _ in mine], [grads[row] for _, row in mine])
            gathers.append(self._gather(params, layouts[i]))
        for out, params, layout, handle in gathers:
            handle.wait()
            for slot, j in enumerate(layout):
                if j is not None:
                    params[j].copy_(out[slot])
        return loss

    def _by_shape(self, group: dict) -> list[list[torch.Tensor]]:
        """The group's matrices by shape, in parameter order. One process skips a matrix without a
        gradient; sharded, every rank takes them all (a missing gradient is zeros on that rank), so
        that the ranks' collectives match."""
        by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None or self.world_size > 1:
                by_shape[tuple(p.shape)].append(p)
        return list(by_shape.values())

    def _layouts(self, counts: list[int]) -> list[list[int | None]]:
        """For each shape's n matrices, the slots of its stack: world_size equal slices (rank r reads
        slice r), each slot a matrix's index or None for padding. The padding of successive shapes
        falls on successive ranks, so every rank owns about 1/world_size of all matrices. The same
        on every rank and at every step (the owners keep the momentum)."""
        layouts, offset, W = [], 0, self.world_size
        for n in counts:
            k = -(-n // W)
            padded = {(offset + t) % W for t in range(W * k - n)}
            offset += W * k - n
            indices = iter(range(n))
            layouts.append([None if r in padded and slot == k - 1 else next(indices)
                            for r in range(W) for slot in range(k)])
        return layouts

    def _mine(self, layout: list[int | None]) -> list[tuple[int, int]]:
        """(matrix index, row of this rank's slice) of the matrices this rank updates."""
        k = len(layout) // self.world_size
        return [(j, row) for row, j in enumerate(layout[self.rank * k:(self.rank + 1) * k]) if j is not None]

    def _reduce(self, params: list[torch.Tensor], layout: list[int | None]):
        """Start summing the stacked gradients over ranks, each rank receiving its slice: (slice,
        the stack it reads from, the handle)."""
        p0 = params[0]
        stacked = torch.zeros((len(layout), *p0.shape), dtype=p0.dtype, device=p0.device)
        for slot, j in enumerate(layout):
            if j is not None and params[j].grad is not None:
                stacked[slot].copy_(params[j].grad)
        mine = torch.empty((len(layout) // self.world_size, *p0.shape), dtype=p0.dtype, device=p0.device)
        return mine, stacked, dist.reduce_scatter_tensor(mine, stacked, async_op=True)

    def _gather(self, params: list[torch.Tensor], layout: list[int | None]):
        """Start all-gathering every rank's updated slice: (the gathered stack, params, layout, the handle)."""
        p0 = params[0]
        slice_ = torch.zeros((len(layout) // self.world_size, *p0.shape), dtype=p0.dtype, device=p0.device)
        for j, row in self._mine(layout):
            slice_[row].copy_(params[j])
        out = torch.empty((len(layout), *p0.shape), dtype=p0.dtype, device=p0.device)
        return out, params, layout, dist.all_gather_into_tensor(out, slice_, async_op=True)

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Momentum, orthogonalisation and the step for matrices of one shape, given their gradients."""
        if not params:
            return
        directions = []
        for p, g in zip(params, grads, strict=True):
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
            buf.lerp_(g, 1 - group["momentum"])
            directions.append(g.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        updates = orthogonalize(torch.stack(directions), group["ns_steps"], getattr(torch, group["ns_dtype"]))
        rows, cols = params[0].shape
        scale = math.sqrt(max(1.0, rows / cols))
        for p, u in zip(params, updates, strict=True):
            u = u.to(p.dtype)
            if group["normuon"]:
                u = self._normalise_rows(p, u, group["beta2"])
            if group["weight_decay"] and group["cautious_wd"]:
                p.sub_(p * (u * p > 0), alpha=group["lr"] * group["weight_decay"])
            elif group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(u, alpha=-group["lr"] * scale)

    def _normalise_rows(self, p: torch.Tensor, u: torch.Tensor, beta2: float) -> torch.Tensor:
        """u divided per row by the root of a running mean of its squared entries, rescaled to u's norm."""
        v = self.state[p].setdefault("row_second_moment", torch.zeros(u.size(0), 1, dtype=u.dtype, device=u.device))
        v.lerp_(u.square().mean(dim=1, keepdim=True), 1 - beta2)
        normed = u / (v.sqrt() + 1e-10)
        return normed * (u.norm() / normed.norm().clamp(min=1e-10))


class ShardedAdamW(torch.optim.AdamW):
    """AdamW where each of `world_size` ranks steps only its own rows of every matrix (ZeRO stage 1).

    A matrix whose rows split evenly is represented here by this rank's block of rows, a view into
    the full weight: its gradient is reduce-scattered (summed) into that block, AdamW's fused kernel
    steps the block and keeps moments for it alone, and the blocks are all-gathered back into every
    rank's full weight. Vectors (and matrices whose rows do not split evenly) are small: their
    gradients are all-reduced and every rank steps them whole. `reduce_gradients` starts the
    reductions early, so they travel while Muon orthogonalises (`HybridOptimizer.step`).
    """

    def __init__(self, groups: list[dict], world_size: int, rank: int, **kwargs):
        self.world_size, self.rank = world_size, rank
        self._sources: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (what AdamW steps, weight, sharded)
        stepped_groups = []
        for group in groups:
            stepped = []
            for p in group["params"]:
                sharded = p.ndim >= 2 and p.size(0) % world_size == 0
                rows = p.size(0) // world_size
                view = p.detach()[rank * rows:(rank + 1) * rows] if sharded else p.detach()
                self._sources.append((view, p, sharded))
                stepped.append(view)
            stepped_groups.append({**group, "params": stepped})
        self._pending: list = []
        super().__init__(stepped_groups, **kwargs)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Start the gradients' reductions (idempotent until the next step)."""
        if self._pending:
            return
        for view, p, sharded in self._sources:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if sharded:
                view.grad = torch.empty_like(view)
                self._pending.append(dist.reduce_scatter_tensor(view.grad, grad, async_op=True))
            else:
                view.grad = grad
                self._pending.append(dist.all_reduce(grad, async_op=True))

    @torch.no_grad()
    def step(self, closure=None):
        self.reduce_gradients()
        for handle in self._pending:
            handle.wait()
        self._pending = []
        loss = super().step(closure)
        gathers = [dist.all_gather_into_tensor(p.detach(), view.clone(), async_op=True)
                   for view, p, sharded in self._sources if sharded]
        for handle in gathers:
            handle.wait()
        for view, _, _ in self._sources:
            view.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for view, p, _ in self._sources:
            view.grad = None
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


class HybridOptimizer:
    """Several torch optimizers stepped as one: what the training loop and checkpoints see."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:  # sharded: AdamW's gradients travel while Muon computes
            if isinstance(opt, ShardedAdamW):
                opt.reduce_gradients()
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
    """Muon + AdamW for `model` with the README's learning-rate rules. Under torchrun both are sharded
    over the ranks (`Muon`, `ShardedAdamW`): the model must then not be wrapped in DDP, since the
    optimizer itself sums the ranks' gradients."""
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
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    adam_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=fused)
    optimizers: list[torch.optim.Optimizer] = [
        ShardedAdamW(adam_groups, world_size, rank, **adam_kwargs) if world_size > 1
        else torch.optim.AdamW(adam_groups, **adam_kwargs)
    ]
    if cfg.optimizer == "muon" and groups["matrix"]:
        # bf16 matmuls are the fast path on GPUs; CPUs without bf16 units emulate them ~20x slower.
        ns_dtype = "bfloat16" if on_cuda else "float32"
        optimizers.insert(0, Muon([{"params": groups["matrix"], "name": "matrix"}],
                                  lr=cfg.matrix_lr * batch_scale, momentum=cfg.muon_momentum,
                                  weight_decay=cfg.weight_decay, ns_dtype=ns_dtype,
                                  cautious_wd=cfg.cautious_weight_decay, normuon=cfg.normuon,
                                  world_size=world_size, rank=rank))
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
