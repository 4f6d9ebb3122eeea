"""The GPT: a Llama-style decoder-only transformer, readable top to bottom.

    tokens ─► embedding ─► RMSNorm ─► n_layer × Block ─► RMSNorm ─► head ─► (soft-cap) ─► logits
    Block:  x + Attention(RMSNorm(x))  then  x + MLP(RMSNorm(x))            (pre-norm residual)

- RMSNorm (Zhang & Sennrich 2019) without a learnable gain: F.rms_norm only. A gain per channel
  adds little once every matrix around it is trained, and without it every parameter is a matrix,
  which keeps the optimizer split (Muon for matrices, AdamW for embedding/head) simple.
- Rotary position embeddings (RoPE, Su et al. 2021) on queries and keys; no position embedding.
- Causal attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on
  CUDA), with grouped-query attention (Ainslie et al. 2023) when n_kv_head < n_head, and optional
  QK-norm (RMSNorm of each query and key head) that keeps attention logits bounded in bf16.
- SwiGLU MLP (Shazeer 2020) by default, ReLU² (So et al. 2021) as an option; no biases anywhere.
- Output projections of every block start at zero, so each block starts as the identity.
- A KV cache for generation: prefill a batch of prompts, then decode one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.config import ConfigError
from nanochat.errors import NanochatError

if TYPE_CHECKING:
    from nanochat.config import ModelConfig

ROPE_HEADROOM = 4  # rotary tables cover 4 × sequence_len positions, so generation can run past it


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 6
    n_kv_head: int = 6
    sequence_len: int = 2048
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    rope_theta: float = 10000.0
    qk_norm: bool = True
    logit_softcap: float = 15.0  # 0 = off
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"n_embd ({self.n_embd}) must split into {self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.mlp not in ("swiglu", "relu2"):
            raise ConfigError(f"mlp must be 'swiglu' or 'relu2' (got {self.mlp!r})")

    @classmethod
    def from_model_config(cls, model: ModelConfig, vocab_size: int) -> GPTConfig:
        """The model a user's `ModelConfig` (depth-driven shape) describes, for a tokenizer's vocabulary."""
        return cls(vocab_size=vocab_size, n_layer=model.depth, n_embd=model.n_embd, n_head=model.n_head,
                   n_kv_head=model.n_kv_head or model.n_head, sequence_len=model.sequence_len, mlp=model.mlp,
                   rope_theta=model.rope_theta, qk_norm=model.qk_norm, logit_softcap=model.logit_softcap,
                   tie_embeddings=model.tie_embeddings)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: the vocabulary rounded up to a multiple of 64, which the
        matmul kernels prefer. The extra rows are never a target and are sliced off the logits."""
        return -(-self.vocab_size // 64) * 64

    @property
    def mlp_hidden(self) -> int:
        """ReLU²: 4·n_embd (two matrices, 8·n_embd² parameters). SwiGLU has three matrices, so its
        hidden size is 8/3·n_embd, rounded up to a multiple of 64, for about the same parameters."""
        if self.mlp == "relu2":
            return 4 * self.n_embd
        return -(-8 * self.n_embd // (3 * 64)) * 64


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(n_pos: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle position·θ_i, θ_i = theta^(-2i/head_dim), shape (n_pos, head_dim/2).
    Computed in float64 (angles reach thousands of radians) and stored in float32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + d/2]) of a head by its angle: as a complex number
    x_i + j·x_{i+d/2} multiplied by e^{j·angle}. x: (B, H, T, d); cos, sin broadcast to (B, H, T, d/2).
    Done in float32 so that bf16 activations are rotated without extra rounding."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer while a batch of sequences is generated.

    k and v are preallocated, (n_layer, B, n_kv_head, max_len, head_dim). Prompts of different
    lengths are right-aligned: row b is left-padded with pad[b] filler tokens so that every row
    ends at the same slot and all rows then decode in lockstep (one new slot per step for all).
    Attention never looks at a row's pad slots, and positions count from each row's first real
    token, so each row's logits are exactly those of its prompt run alone.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 pad: torch.Tensor | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.padded = pad is not None and bool(pad.any())  # no pad slots: decoding needs no mask at all
        self.pos = 0  # slots filled so far, the same for every row
        self.max_len = max_len

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, n_kv_head, T, head_dim) of one layer at slots pos..pos+T-1 and
        return all of that layer's keys and values so far. `GPT.forward` advances pos after the last layer."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slice of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_norm = config.qk_norm
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # before or after RoPE is the same: a rotation keeps the RMS
            q, k = norm(q), norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        if self.n_kv_head != self.n_head:  # GQA: each group of query heads shares one key/value head
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        # mask: "causal" (training, a first chunk: flash kernels), "all" (one new token, no pad slots),
        # or a boolean tensor that also hides pad slots.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if isinstance(mask, torch.Tensor) else None,
                                           is_causal=isinstance(mask, str) and mask == "causal")
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=False) if self.swiglu else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        h = F.silu(self.c_gate(x)) * h if self.swiglu else F.relu(h).square()
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.attn(norm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Not saved with the weights: recomputed from the config.
        n_pos = ROPE_HEADROOM * config.sequence_len
        self.register_buffer("cos", torch.empty(n_pos, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(n_pos, config.head_dim // 2), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw fresh weights and fill the rotary tables. Also the way to materialise a model built
        on the meta device: `model.to_empty(device=...)` then `model.init_weights()`."""
        cfg = self.config
        cos, sin = rotary_tables(self.cos.size(0), cfg.head_dim, cfg.rope_theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc, block.mlp.c_gate):
                if linear is not None:  # std 1/√fan_in keeps activations at unit scale
                    nn.init.normal_(linear.weight, std=cfg.n_embd ** -0.5)
            # Zero output projections: every block starts as the identity on the residual stream.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if cfg.tie_embeddings:
            # One matrix for both ends: the input is RMS-normed anyway, and this std gives unit-scale logits.
            nn.init.normal_(self.wte.weight, std=cfg.n_embd ** -0.5)
        else:
            # The embedding scale is irrelevant (RMSNorm follows); a small head gives near-uniform
            # predictions, an initial loss of about ln(vocab_size).
            nn.init.normal_(self.wte.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=0.001)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: Literal["mean", "sum"] = "mean", kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T; -1 = no loss there): the cross-entropy, mean over
        the counted positions (0 when there are none) or their sum. Else float32 logits (B, T, vocab).
        With a kv_cache, idx are the next T tokens of every row (a prompt, then one at a time)."""
        B, T = idx.shape
        if kv_cache is None:
            if T > self.cos.size(0):
                raise NanochatError(f"sequence of {T} tokens is longer than the model's {self.cos.size(0)} positions")
            cos, sin, mask = self.cos[:T], self.sin[:T], "causal"
        elif kv_cache.pos + T > kv_cache.max_len:
            raise NanochatError(f"KV cache full: {kv_cache.pos} + {T} tokens > max_len {kv_cache.max_len}")
        elif not kv_cache.padded and (T == 1 or kv_cache.pos == 0):
            # The common case, cheap: no pad slots, so positions are slots, and the new tokens are either
            # one (it sees every slot so far) or the first chunk (plain causal attention).
            cos, sin = self.cos[kv_cache.pos:kv_cache.pos + T], self.sin[kv_cache.pos:kv_cache.pos + T]
            mask = "all" if T == 1 else "causal"
        else:
            slot = kv_cache.pos + torch.arange(T, device=idx.device)  # (T,) cache slots of the new tokens
            pad = kv_cache.pad.view(B, 1, 1)
            pos = (slot - pad[:, 0]).clamp(min=0)  # (B, T) position in each row's own text
            cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # (B, 1, T, d/2)
            key = torch.arange(kv_cache.pos + T, device=idx.device)
            # Causal, and never a pad slot; a pad slot sees itself so that no softmax row is empty (NaN).
            mask = (key <= slot[:, None]) & ((key >= pad) | (key == slot[:, None]))  # (B, T, L)
            mask = mask.unsqueeze(1)  # (B, 1, T, L), broadcast over heads

        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin, mask, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.pos += T

        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        if self.config.logit_softcap:  # smoothly bound logits to ±cap
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction="sum")
        if loss_reduction == "sum":
            return loss
        return loss / (targets != -1).sum().clamp(min=1)

    def new_kv_cache(self, batch_size: int, max_len: int, pad: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` slots (pad slots included); `pad`
        is each row's number of left-pad tokens. dtype: what k/v are computed in (the autocast dtype)."""
        if max_len > self.cos.size(0):
            raise NanochatError(f"max_len {max_len} exceeds the model's {self.cos.size(0)} rotary positions")
        cfg = self.config
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim, pad,
                       self.lm_head.weight.device, dtype)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied matrix once). exclude_embeddings drops the input embedding, a lookup
        rather than a matmul; a tied head's matrix is then still counted, as the head uses it."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, the PaLM accounting:

        6·N for the matmuls with weights, N = every parameter except the embedding lookup (all block
        matrices plus the head, over the padded vocabulary); 2 FLOPs per multiply-add forward, twice
        that backward. Plus attention's two activation matmuls (q·kᵀ and attention·v), each 2·T·d_q
        forward per token and layer with d_q = n_head·head_dim, ×3 for backward: 12·n_layer·d_q·T.
        As is customary, the causal mask's skipped half is not subtracted.
        """
        cfg = self.config
        T = seq_len or cfg.sequence_len
        return 6 * self.num_params(exclude_embeddings=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
