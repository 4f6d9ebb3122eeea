import itertools
import math

import pytest
import torch

from nanochat.config import PRESETS, ConfigError, ModelConfig
from nanochat.errors import NanochatError
from nanochat.gpt import GPT, GPTConfig, apply_rotary, rotary_tables

SMALL = dict(vocab_size=100, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, sequence_len=32)
VARIANTS = [  # (mlp, n_kv_head, qk_norm): each option on its own
    ("swiglu", 4, True), ("relu2", 4, True), ("swiglu", 2, True), ("swiglu", 1, True), ("swiglu", 4, False)]


def active_model(seed: int = 0, **overrides) -> GPT:
    """A small model with every weight random. At init the blocks are the identity (zero output
    projections) and logits are near zero, which would let wrong attention pass unnoticed."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=p.size(-1) ** -0.5)
        model.lm_head.weight.normal_(std=0.5)  # logits of a few units: softmax far from uniform
    return model.eval()


def test_param_count_and_flops_equal_a_hand_count():
    model = GPT(GPTConfig(**SMALL))  # vocab 100 → 128 rows; head_dim 16; SwiGLU hidden 8/3·64 → 192
    wte = head = 128 * 64
    attn = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k and v with 2 kv heads of 16, out projection
    mlp = 3 * 64 * 192
    assert model.num_params() == wte + 2 * (attn + mlp) + head == 114_688
    assert model.num_params(exclude_embeddings=True) == 2 * (attn + mlp) + head == 106_496
    # 6·N plus attention: 2 layers × (q·kᵀ and att·v: 2·2·T·64 forward, ×3 with backward) at T = 32
    assert model.flops_per_token() == 6 * 106_496 + 2 * 3 * 2 * 2 * 32 * 64 == 688_128
    assert model.flops_per_token(seq_len=64) == 6 * 106_496 + 12 * 2 * 64 * 64

    relu2 = GPT(GPTConfig(**{**SMALL, "mlp": "relu2", "n_kv_head": 4}))
    assert relu2.num_params() == 2 * 128 * 64 + 2 * (4 * 64 * 64 + 2 * 64 * 256)
    tied = GPT(GPTConfig(**{**SMALL, "tie_embeddings": True}))
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.num_params() == tied.num_params(exclude_embeddings=True) == 114_688 - wte  # head still a matmul


def test_config_from_the_tiny_preset_and_validation():
    cfg = GPTConfig.from_model_config(PRESETS["tiny"].model, vocab_size=8192)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (4, 128, 4, 4, 32)
    assert (cfg.sequence_len, cfg.mlp, cfg.qk_norm, cfg.mlp_hidden) == (256, "swiglu", True, 384)
    gqa = GPTConfig.from_model_config(ModelConfig(depth=20, n_kv_head=5), vocab_size=65537)
    assert (gqa.n_embd, gqa.n_head, gqa.n_kv_head, gqa.padded_vocab_size) == (1280, 10, 5, 65600)
    with pytest.raises(ConfigError, match="n_kv_head"):
        GPTConfig(vocab_size=10, n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="even"):
        GPTConfig(vocab_size=10, n_embd=60, n_head=4, n_kv_head=4)


def test_init_zero_output_projections_and_uniform_predictions():
    model = GPT(GPTConfig(**SMALL))
    for block in model.blocks:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_q.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.1)
    x = torch.randint(0, 100, (2, 32))
    assert model(x, x).item() == pytest.approx(math.log(100), abs=0.01)
    assert model.lm_head.weight.shape == (128, 64) and model(x).shape == (2, 32, 100)  # padded rows sliced off


def test_loss_masking_and_reductions():
    model = active_model()
    x = torch.randint(0, 100, (2, 16))
    y = torch.randint(0, 100, (2, 16))
    y[0, :5] = -1
    per_token = torch.nn.functional.cross_entropy(model(x).view(-1, 100), y.view(-1), ignore_index=-1,
                                                 reduction="none")
    kept = per_token[y.view(-1) != -1]
    torch.testing.assert_close(model(x, y), kept.mean())
    torch.testing.assert_close(model(x, y, loss_reduction="sum"), kept.sum())

    model.train()
    loss = model(x, torch.full_like(y, -1))  # nothing to learn here: 0, not 0/0
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_softcap_bounds_logits():
    model = active_model(logit_softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    logits = model(torch.randint(0, 100, (1, 8)))
    assert logits.abs().max().item() <= 2.0 and logits.abs().max().item() > 1.9


def test_rotary_equals_complex_rotation():
    d, T, theta = 16, 40, 10000.0
    cos, sin = rotary_tables(T, d, theta)
    x = torch.randn(2, 3, T, d)
    got = apply_rotary(x, cos, sin)

    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())  # pairs (i, i + d/2)
    freqs = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    want = torch.cat((rotated.real, rotated.imag), dim=-1).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_rotary_attention_scores_depend_only_on_distance():
    cos, sin = rotary_tables(64, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        return apply_rotary(q.view(1, 8), cos[m], sin[m]) @ apply_rotary(k.view(1, 8), cos[n], sin[n]).T

    torch.testing.assert_close(score(5, 2), score(45, 42), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


@pytest.mark.parametrize("mlp,n_kv_head,qk_norm", VARIANTS)
def test_causality(mlp, n_kv_head, qk_norm):
    model = active_model(mlp=mlp, n_kv_head=n_kv_head, qk_norm=qk_norm)
    x = torch.randint(0, 100, (2, 32))
    base = model(x)
    for t in (0, 11, 31):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 100
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])  # the changed token itself does matter


@pytest.mark.parametrize("mlp,n_kv_head,qk_norm", VARIANTS)
def test_kv_cache_prefill_and_decode_equal_full_forward(mlp, n_kv_head, qk_norm):
    model = active_model(mlp=mlp, n_kv_head=n_kv_head, qk_norm=qk_norm)
    g = torch.Generator().manual_seed(1)
    lengths, n_new = [5, 12, 1, 9], 7
    prompts = [torch.randint(0, 100, (n,), generator=g) for n in lengths]
    new = torch.randint(0, 100, (len(lengths), n_new), generator=g)  # tokens fed while decoding
    T = max(lengths)
    pad = torch.tensor([T - n for n in lengths])
    idx = torch.stack([torch.cat((torch.full((T - len(p),), 99), p)) for p in prompts])  # left-padded

    cache = model.new_kv_cache(len(lengths), T + n_new, pad=pad)
    with torch.no_grad():
        prefill = model(idx, kv_cache=cache)
        steps = [model(new[:, i:i + 1], kv_cache=cache)[:, 0] for i in range(n_new)]
        assert cache.pos == T + n_new
        for b, p in enumerate(prompts):
            full = model(torch.cat((p, new[b]))[None])[0]  # the row on its own, no padding
            torch.testing.assert_close(prefill[b, pad[b]:], full[:len(p)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.stack([s[b] for s in steps]), full[len(p):], atol=1e-5, rtol=1e-5)


def test_kv_cache_chunked_prefill_and_overflow():
    model = active_model()
    x = torch.randint(0, 100, (2, 20))
    cache = model.new_kv_cache(2, 20)
    with torch.no_grad():
        # No pad slots: the first chunk and single tokens take the mask-free path, other chunks the masked one.
        cuts = [0, 8, 13, 14, 15, 20]
        chunks = torch.cat([model(x[:, a:b], kv_cache=cache) for a, b in itertools.pairwise(cuts)], dim=1)
        torch.testing.assert_close(chunks, model(x), atol=1e-5, rtol=1e-5)
        assert cache.k.shape == (2, 2, 2, 20, 16)  # (n_layer, B, n_kv_head, max_len, head_dim)
        with pytest.raises(NanochatError, match="KV cache full"):
            model(x[:, :1], kv_cache=cache)
    with pytest.raises(NanochatError, match="rotary positions"):
        model.new_kv_cache(1, 10_000)


def test_bf16_autocast_forward_backward_and_cache():
    model = active_model().train()
    x = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    cache = model.new_kv_cache(2, 17, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, kv_cache=cache)
        logits = model(x[:, :1], kv_cache=cache)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.gpu
def test_compiled_bf16_matches_eager_on_cuda():
    model = active_model().cuda().train()
    x = torch.randint(0, 100, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x, x)
        compiled = torch.compile(model)(x, x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
