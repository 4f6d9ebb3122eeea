"""`nanochat verify-model`: the sanity check that the GPT can learn at all.

One random batch (x, y), trained on alone: a working model memorises it (loss → 0) within a hundred
steps, while a broken one (rotary tables broadcast over the wrong axis, a leaky or over-strict
attention mask, a dead init) stalls. A second check perturbs the last token and requires every
earlier logit to stay put, which a leaky mask cannot pass even when it memorises quickly.
"""

from __future__ import annotations

import math

import torch

from nanochat.config import VerifyModelConfig, parse_config
from nanochat.errors import NanochatError
from nanochat.gpt import GPT
from nanochat.runtime import init_runtime, print0

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 50) -> str:
    """The curve on a log scale (losses span decades), resampled to at most `width` characters."""
    picks = [values[i * len(values) // width] for i in range(width)] if len(values) > width else values
    logs = [math.log10(max(v, 1e-6)) for v in picks]
    finite = [v for v in logs if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    return "".join(SPARKS[round((v - lo) / (hi - lo or 1) * (len(SPARKS) - 1))] if math.isfinite(v) else "?"
                   for v in logs)


def cli(argv: list[str]) -> int:
    cfg = parse_config(VerifyModelConfig, argv, prog="nanochat verify-model",
                       description="Train the GPT on one random batch; pass when the loss falls to "
                                   "--target-loss within --steps steps and attention is causal.")
    rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype, seed=cfg.seed)
    shape = cfg.model
    model = GPT(shape, cfg.vocab_size).to(rt.device)
    T = shape.sequence_len
    tokens = torch.randint(cfg.vocab_size, (cfg.batch_size, T + 1), device=rt.device)
    # Rows start with distinct tokens: two identical contexts asking for different next tokens
    # would put an unlearnable floor under the loss.
    tokens[:, 0] = torch.randperm(cfg.vocab_size, device=rt.device)[:cfg.batch_size]
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    print0(f"model: {shape.depth} layers, {shape.n_embd} wide, {shape.n_head} heads "
           f"({shape.kv_heads} kv), {shape.mlp}, qk_norm {'on' if shape.qk_norm else 'off'}, "
           f"{model.num_params():,} parameters; batch {cfg.batch_size}×{T} on {rt.device}")
    print0(f"initial loss should be near ln(vocab) = {math.log(cfg.vocab_size):.3f}")

    losses = []
    for step in range(cfg.steps + 1):  # the last pass only measures the final loss
        with rt.autocast():
            loss = model(x, y)
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.steps:
            print0(f"step {step:4d}  loss {losses[-1]:.4f}")
        if step == cfg.steps or not math.isfinite(losses[-1]):
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print0(f"loss curve (log scale): {sparkline(losses)}")

    if not losses[-1] <= cfg.target_loss:  # `not` so that NaN fails too
        raise NanochatError(
            f"loss {losses[-1]:.4g} after {cfg.steps} steps, target {cfg.target_loss}: the model cannot memorise "
            "one batch. Check the rotary embedding (cos/sin must broadcast as (T, head_dim/2) over batch and "
            "heads, not over the wrong axis), the attention mask (causal, not hiding the token itself), and "
            "that the output projections/head still get gradients.")

    with torch.no_grad(), rt.autocast():
        changed = x.clone()
        changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
        leak = (model(x)[:, :-1] - model(changed)[:, :-1]).abs().max().item()
    if leak > 1e-4:
        raise NanochatError(f"changing the last token moved earlier logits by {leak:.3g}: attention is not "
                            "causal. Check the mask passed to scaled_dot_product_attention (is_causal for "
                            "training, and the KV-cache mask).")
    print0(f"ok: loss {losses[-1]:.4f} ≤ {cfg.target_loss} after {cfg.steps} steps; attention is causal")
    return 0
