"""A nanochat model for Hugging Face transformers (loaded with `trust_remote_code=True`).

This file is copied into every export whose model uses parts of nanochat's recipe that no
architecture shipped with transformers has: the bigram hash embedding, the smear, value
embeddings (optionally gated), the x0 mix-in, the tanh soft-cap on the logits. It depends on
torch and transformers only, and computes what `nanochat.gpt.GPT` computes, with the same
parameter names, so the exported `model.safetensors` is the checkpoint's weights as they are.

Generation recomputes the whole sequence at every step (no KV cache): exact, and simple for
models of this size; `use_cache` is ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

VE_GATE_CHANNELS = 32
SMEAR_CHANNELS = 16
BIGRAM_MULTIPLIER = 1_000_003


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat_recipe"

    def __init__(self, vocab_size: int = 65536, padded_vocab_size: int = 65536, depth: int = 20, n_head: int = 10,
                 n_kv_head: int = 10, head_dim: int = 128, mlp: str = "swiglu", mlp_hidden: int = 3584,
                 rope_theta: float = 10000.0, max_position_embeddings: int = 8192, qk_norm: bool = True,
                 logit_softcap: float = 15.0, value_embed_layers: tuple = (), ve_gate: bool = False,
                 smear: bool = True, bigram_multiple: int = 4, attn_scale: float = 0.0, x0_skip: bool = False,
                 tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size, self.padded_vocab_size, self.depth, self.n_head = vocab_size, padded_vocab_size, depth, n_head
        self.n_kv_head, self.head_dim, self.mlp, self.mlp_hidden = n_kv_head, head_dim, mlp, mlp_hidden
        self.rope_theta, self.max_position_embeddings = rope_theta, max_position_embeddings
        self.qk_norm, self.logit_softcap, self.value_embed_layers = qk_norm, logit_softcap, list(value_embed_layers)
        self.ve_gate, self.smear, self.bigram_multiple = ve_gate, smear, bigram_multiple
        self.attn_scale, self.x0_skip = attn_scale, x0_skip
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = n_head * head_dim, depth, n_head
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each pair (x_i, x_{i+d/2}) turned by its angle, in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: NanochatConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_norm, self.scale = config.qk_norm, config.attn_scale or None
        width = config.n_head * config.head_dim
        self.c_q = nn.Linear(width, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(width, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(width, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, width, bias=False)
        self.ve_gate = (nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)
                        if config.ve_gate and layer in config.value_embed_layers else None)

    def forward(self, x, ve, cos, sin, mask):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            if self.ve_gate is not None:
                ve = ve * (2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))).unsqueeze(-1)
            v = v + ve
        v = v.transpose(1, 2)
        if self.qk_norm:
            q, k = norm(q), norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: NanochatConfig):
        super().__init__()
        width, self.swiglu = config.n_head * config.head_dim, config.mlp == "swiglu"
        self.c_fc = nn.Linear(width, config.mlp_hidden, bias=False)
        self.c_gate = nn.Linear(width, config.mlp_hidden, bias=False) if self.swiglu else None
        self.c_proj = nn.Linear(config.mlp_hidden, width, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(F.silu(self.c_gate(x)) * h if self.swiglu else F.relu(h).square())


class Block(nn.Module):
    def __init__(self, config: NanochatConfig, layer: int):
        super().__init__()
        self.attn, self.mlp = Attention(config, layer), MLP(config)

    def forward(self, x, ve, cos, sin, mask):
        x = x + self.attn(norm(x), ve, cos, sin, mask)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    base_model_prefix = ""
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}  # used only with tie_word_embeddings

    def __init__(self, config: NanochatConfig):
        super().__init__(config)
        width, rows = config.n_head * config.head_dim, config.padded_vocab_size
        self.wte = nn.Embedding(rows, width)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.lm_head = nn.Linear(width, rows, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(rows, config.n_kv_head * config.head_dim)
                                           for i in config.value_embed_layers})
        if config.smear:
            self.smear_gate = nn.Parameter(torch.zeros(SMEAR_CHANNELS + 1))
        if config.bigram_multiple:
            self.bigram_embed = nn.Embedding(config.bigram_multiple * rows, width)
        if config.x0_skip:
            self.resid_lambdas = nn.Parameter(torch.ones(config.depth))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.depth))
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def get_output_embeddings(self):
        return self.lm_head

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, T, d/2) of each position's angles, computed in float64 as nanochat does."""
        cfg = self.config
        inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64,
                                                    device=positions.device) / cfg.head_dim)
        angles = positions.to(torch.float64)[..., None] * inv_freq
        return angles.cos().float()[:, None], angles.sin().float()[:, None]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab_size) of every position. With `attention_mask` (1 = token, 0 = padding,
        left padding as for batched generation) each row's positions start at its first token."""
        cfg, idx = self.config, input_ids
        B, T = idx.shape
        keep = (torch.ones_like(idx, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(torch.bool))
        positions = (keep.long().cumsum(dim=1) - 1).clamp(min=0)
        cos, sin = self._rotary(positions)
        mask = None
        if not bool(keep.all()):  # causal, never a padding key; a padding row sees itself (no empty softmax)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=idx.device)
            mask = ((causal & keep[:, None, :]) | eye)[:, None]

        x = norm(self.wte(idx))
        if cfg.smear or cfg.bigram_multiple:
            has_prev = (positions > 0) & keep
            prev = torch.cat((torch.zeros_like(idx[:, :1]), idx[:, :-1]), dim=1)
            if cfg.smear:
                prev_x = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1) * has_prev.unsqueeze(-1)
                w, strength = self.smear_gate[:-1], self.smear_gate[-1]
                x = x + (strength * torch.sigmoid(x[..., :SMEAR_CHANNELS] @ w.to(x.dtype))).unsqueeze(-1) * prev_x
            if cfg.bigram_multiple:
                prev = torch.where(has_prev, prev, cfg.vocab_size)
                bucket = (prev * BIGRAM_MULTIPLIER + idx) % self.bigram_embed.num_embeddings
                x = norm(x + self.bigram_embed(bucket))
        x0 = x
        for i, block in enumerate(self.blocks):
            if cfg.x0_skip:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, mask)
        logits = F.linear(norm(x), self.lm_head.weight[:cfg.vocab_size]).float()
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        loss = None
        if labels is not None:  # the usual shift: position t predicts token t + 1; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Every step sees the whole sequence so far (there is no KV cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
