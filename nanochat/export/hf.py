"""A trained model as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load.

Which architecture (`--arch auto` picks the first that is exact):
  qwen3   transformers' own Qwen3, no remote code, when the model uses none of the recipe's
          extra parts and has QK-norm. Exact because every difference is a weight, not code:
            - our parameter-free RMSNorms are Qwen3's RMSNorms with unit weights
              (input/post-attention layernorms, the final norm, q_norm and k_norm per head),
              with `rms_norm_eps` = float32's machine epsilon, which F.rms_norm uses;
            - our RMSNorm of the token embedding acts on each embedding row alone, so it is
              folded into the exported `embed_tokens` (each row normalised once, here);
            - both use rotate-half RoPE with inv_freq = θ^(-2i/d) and 1/√head_dim attention;
              `head_dim`, `rope_theta`, GQA's `num_key_value_heads`, no biases, no sliding window;
            - the padded vocabulary rows (never a target) are dropped; the head is exported
              untied even when ours is tied, since the input side is now normalised.
  llama   the same, for a model without QK-norm (Llama has no q_norm / k_norm).
  nanochat  transformers' NanoChat (the reference nanochat's original model): ReLU² MLP, QK-norm
          after RoPE, parameter-free norms (its own, with our epsilon), the embedding norm in its
          code, the logit soft-cap as `final_logit_softcapping`. Its RoPE turns the other way
          (rotate_half gives (x2, -x1)), so the second half of every query and key head is
          negated in the exported q/k weights: both the rotated q and k then come out with that
          half negated, and their dot products, hence attention, are ours exactly.
  remote  our modeling file (`modeling_nanochat.py`, copied into the export; `trust_remote_code=True`):
          any model, the weights as they are. The only choice for the recipe's defaults (bigram
          hash embedding, smear, value embeddings, x0 mix-in, logit soft-cap, ReLU²).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, NanoChatConfig, Qwen3Config

from nanochat.config import ModelConfig
from nanochat.errors import NanochatError
from nanochat.export import modeling_nanochat
from nanochat.export.hf_tokenizer import to_hf_tokenizer
from nanochat.gpt import GPT, ROPE_HEADROOM
from nanochat.tokenizer import Tokenizer

ARCHS = ("auto", "qwen3", "llama", "nanochat", "remote")
STANDARD = ("qwen3", "llama", "nanochat")  # transformers' own, in the order --arch auto tries them


def unmapped_parts(cfg: ModelConfig, arch: str) -> list[str]:
    """What a model has that `arch` (qwen3 / llama) cannot compute: each entry would change its outputs."""
    parts = []
    if cfg.bigram_multiple:
        parts.append("the bigram hash embedding (--bigram-multiple)")
    if cfg.smear:
        parts.append("the smear (--smear)")
    if cfg.value_embeddings:
        parts.append("value embeddings (--value-embeddings)")
    if cfg.x0_skip:
        parts.append("the x0 mix-in (--x0-skip)")
    if cfg.logit_softcap and arch != "nanochat":
        parts.append(f"the logit soft-cap (--logit-softcap {cfg.logit_softcap:g})")
    wanted = "relu2" if arch == "nanochat" else "swiglu"
    if cfg.mlp != wanted:
        parts.append(f"the {cfg.mlp} MLP (it has {wanted} only)")
    if cfg.attn_scale and abs(cfg.attn_scale - cfg.head_dim ** -0.5) > 1e-12:
        parts.append(f"the attention scale {cfg.attn_scale:g} (it uses 1/sqrt(head_dim))")
    if arch in ("qwen3", "nanochat") and not cfg.qk_norm:
        parts.append(f"no QK-norm ({arch} always normalises q and k: use --arch llama)")
    if arch == "llama" and cfg.qk_norm:
        parts.append("QK-norm (Llama has none: use --arch qwen3)")
    return parts


def choose_arch(cfg: ModelConfig, arch: str) -> str:
    """`arch`, or with "auto" the first exact one of qwen3 / llama / remote; refuses an inexact one."""
    if arch == "auto":
        return next((a for a in STANDARD if not unmapped_parts(cfg, a)), "remote")
    if arch in STANDARD and (parts := unmapped_parts(cfg, arch)):
        raise NanochatError(f"--arch {arch} would change this model's outputs: transformers' {arch} has no "
                            f"{'; no '.join(parts)}. Export with --arch remote (our modeling file, loaded with "
                            "trust_remote_code=True) or --arch auto")
    if arch not in ARCHS:
        raise NanochatError(f"unknown --arch {arch!r}; one of {', '.join(ARCHS)}")
    return arch


def _standard_weights(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under transformers' Llama / Qwen3 names (unit norm weights, the embedding norm folded in)."""
    cfg, V = model.config, model.vocab_size
    ones = {"hidden": torch.ones(cfg.n_embd), "head": torch.ones(cfg.head_dim)}
    out = {"model.embed_tokens.weight": F.rms_norm(model.wte.weight[:V].float(), (cfg.n_embd,)),
           "model.norm.weight": ones["hidden"], "lm_head.weight": model.lm_head.weight[:V]}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        attn, mlp = block.attn, block.mlp
        out |= {f"{p}self_attn.{name}_proj.weight": w for name, w in
                (("q", attn.c_q.weight), ("k", attn.c_k.weight), ("v", attn.c_v.weight), ("o", attn.c_proj.weight))}
        out |= {f"{p}mlp.{name}_proj.weight": w for name, w in
                (("gate", mlp.c_gate.weight), ("up", mlp.c_fc.weight), ("down", mlp.c_proj.weight))}
        out |= {p + "input_layernorm.weight": ones["hidden"], p + "post_attention_layernorm.weight": ones["hidden"]}
        if arch == "qwen3":
            out |= {p + "self_attn.q_norm.weight": ones["head"], p + "self_attn.k_norm.weight": ones["head"]}
    return out


def _nanochat_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' NanoChat names, q and k turned for its RoPE direction."""
    cfg, V = model.config, model.vocab_size
    half = torch.ones(cfg.head_dim)
    half[cfg.head_dim // 2:] = -1  # negate the second half of each head's channels

    def turned(w: torch.Tensor) -> torch.Tensor:  # rows are heads × head_dim
        return (w.view(-1, cfg.head_dim, w.size(1)) * half[None, :, None]).reshape_as(w)

    out = {"model.embed_tokens.weight": model.wte.weight[:V], "lm_head.weight": model.lm_head.weight[:V]}
    for i, block in enumerate(model.blocks):
        p, attn, mlp = f"model.layers.{i}.", block.attn, block.mlp
        out |= {p + "self_attn.q_proj.weight": turned(attn.c_q.weight), p + "self_attn.k_proj.weight":
                turned(attn.c_k.weight), p + "self_attn.v_proj.weight": attn.c_v.weight,
                p + "self_attn.o_proj.weight": attn.c_proj.weight, p + "mlp.fc1.weight": mlp.c_fc.weight,
                p + "mlp.fc2.weight": mlp.c_proj.weight}
    return out


def _standard_config(model: GPT, tok: Tokenizer, arch: str):
    cfg = model.config
    common = dict(vocab_size=model.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.depth, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=ROPE_HEADROOM * cfg.sequence_len,
                  rms_norm_eps=torch.finfo(torch.float32).eps, rope_theta=cfg.rope_theta, attention_bias=False,
                  tie_word_embeddings=False, hidden_act="silu", bos_token_id=tok.special_id("<|bos|>"),
                  eos_token_id=tok.special_id("<|assistant_end|>"), torch_dtype="float32")
    if arch == "nanochat":
        common = {k: v for k, v in common.items() if k not in ("rope_theta", "hidden_act")}
        return NanoChatConfig(**common, hidden_act="relu2", rope_parameters={"rope_type": "default",
                              "rope_theta": cfg.rope_theta}, final_logit_softcapping=cfg.logit_softcap or None,
                              architectures=["NanoChatForCausalLM"])
    if arch == "qwen3":
        return Qwen3Config(**common, use_sliding_window=False, architectures=["Qwen3ForCausalLM"])
    return LlamaConfig(**common, mlp_bias=False, architectures=["LlamaForCausalLM"])


def _remote_config(model: GPT, tok: Tokenizer) -> modeling_nanochat.NanochatConfig:
    cfg = model.config
    config = modeling_nanochat.NanochatConfig(
        vocab_size=model.vocab_size, padded_vocab_size=model.padded_vocab_size, depth=cfg.depth, n_head=cfg.n_head,
        n_kv_head=cfg.kv_heads, head_dim=cfg.head_dim, mlp=cfg.mlp, mlp_hidden=cfg.mlp_hidden,
        rope_theta=cfg.rope_theta, max_position_embeddings=model.max_positions, qk_norm=cfg.qk_norm,
        logit_softcap=cfg.logit_softcap, value_embed_layers=[int(i) for i in model.value_embeds],
        ve_gate=cfg.ve_gate, smear=cfg.smear, bigram_multiple=cfg.bigram_multiple, attn_scale=cfg.attn_scale,
        x0_skip=cfg.x0_skip, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=tok.special_id("<|bos|>"),
        eos_token_id=tok.special_id("<|assistant_end|>"), torch_dtype="float32")
    config.architectures = ["NanochatForCausalLM"]
    config.auto_map = {"AutoConfig": "modeling_nanochat.NanochatConfig",
                       "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"}
    return config


def export_hf(model: GPT, tok: Tokenizer, out: Path, arch: str = "auto", card: str = "") -> str:
    """Write the Hugging Face directory `out` (it must be empty or absent); returns the architecture used."""
    arch = choose_arch(model.config, arch)
    if out.exists() and any(out.iterdir()):
        raise NanochatError(f"{out} exists and is not empty; pass a new --out directory")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if arch == "remote":
        weights = {k: v for k, v in model.state_dict().items()
                   if not (model.config.tie_embeddings and k == "lm_head.weight")}  # tied: stored once, as wte
        config = _remote_config(model, tok)
        shutil.copy(modeling_nanochat.__file__, partial / "modeling_nanochat.py")
    else:
        weights = _nanochat_weights(model) if arch == "nanochat" else _standard_weights(model, arch)
        config = _standard_config(model, tok, arch)
    save_file({k: v.detach().float().contiguous().clone() for k, v in weights.items()},
              partial / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(partial)
    stops = [tok.special_id("<|assistant_end|>"), tok.special_id("<|bos|>")]  # chat_format.stop_ids
    GenerationConfig(bos_token_id=tok.special_id("<|bos|>"), eos_token_id=stops, pad_token_id=stops[0],
                     do_sample=True, temperature=0.6, top_k=50, max_new_tokens=256).save_pretrained(partial)
    to_hf_tokenizer(tok).save_pretrained(partial)
    (partial / "README.md").write_text(card)
    (partial / "nanochat_export.json").write_text(json.dumps({"arch": arch}, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return arch
