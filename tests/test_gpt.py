import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt as gpt_module
from nanochat.config import PRESETS, ConfigError, ModelConfig
from nanochat.errors import NanochatError
from nanochat.gpt import GPT, KVCache, SlotCache, apply_rotary, eval_mode, head_loss, norm, rotary_tables

VOCAB = 100
SMALL = dict(depth=2, aspect_ratio=32, head_dim=16, n_kv_head=2, sequence_len=32,  # 4 heads of 16: 64 wide
             value_embeddings=False, smear=False, bigram_multiple=0)  # the plain model: the other parts are VARIANTS
VARIANTS = [  # each option on its own, then the optional parts together
    dict(n_kv_head=4), dict(mlp="relu2", n_kv_head=4), dict(), dict(n_kv_head=1), dict(n_kv_head=4, qk_norm=False),
    dict(value_embeddings=True), dict(x0_skip=True), dict(value_embeddings=True, x0_skip=True, mlp="relu2"),
    dict(smear=True), dict(bigram_multiple=2),
    dict(value_embeddings=True, ve_gate=True, value_embed_every=1, attn_scale=0.3, smear=True, bigram_multiple=1)]


def active_model(seed: int = 0, **overrides) -> GPT:
    """A small model with every weight random. At init the blocks are the identity (zero output
    projections) and logits are near zero, which would let wrong attention pass unnoticed."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL, **overrides}), VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=p.size(-1) ** -0.5)
        model.lm_head.weight.normal_(std=0.5)  # logits of a few units: softmax far from uniform
    return model.eval()


def test_param_count_and_flops_equal_a_hand_count():
    model = GPT(ModelConfig(**SMALL), VOCAB)  # vocab 100 → 128 rows; head_dim 16; SwiGLU hidden 8/3·64 → 192
    wte = head = 128 * 64
    attn = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k and v with 2 kv heads of 16, out projection
    mlp = 3 * 64 * 192
    assert model.num_params() == wte + 2 * (attn + mlp) + head == 114_688
    assert model.num_params(exclude_embeddings=True) == 2 * (attn + mlp) + head == 106_496
    # 6·N plus attention: 2 layers × (q·kᵀ and att·v: 2·2·T·64 forward, ×3 with backward) at T = 32
    assert model.flops_per_token() == 6 * 106_496 + 2 * 3 * 2 * 2 * 32 * 64 == 688_128
    assert model.flops_per_token(seq_len=64) == 6 * 106_496 + 12 * 2 * 64 * 64

    relu2 = GPT(ModelConfig(**{**SMALL, "mlp": "relu2", "n_kv_head": 4}), VOCAB)
    assert relu2.num_params() == 2 * 128 * 64 + 2 * (4 * 64 * 64 + 2 * 64 * 256)
    tied = GPT(ModelConfig(**{**SMALL, "tie_embeddings": True}), VOCAB)
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.num_params() == tied.num_params(exclude_embeddings=True) == 114_688 - wte  # head still a matmul


def test_model_from_the_tiny_preset_and_validation():
    shape = PRESETS["tiny"].model
    model = GPT(shape, vocab_size=8192)
    assert model.config is shape and model.vocab_size == 8192  # the one config, not a copy
    assert (shape.depth, shape.n_embd, shape.n_head, shape.kv_heads, shape.head_dim) == (4, 128, 4, 4, 32)
    assert (shape.sequence_len, shape.mlp, shape.qk_norm, shape.mlp_hidden) == (256, "swiglu", True, 384)
    assert len(model.blocks) == 4 and model.blocks[0].mlp.c_fc.weight.shape == (384, 128)
    assert model.padded_vocab_size == 8192 and model.max_positions == 4 * 256
    with torch.device("meta"):  # d20's shape without allocating its weights
        gqa = GPT(ModelConfig(depth=20, n_kv_head=5), vocab_size=65537)
    assert gqa.padded_vocab_size == 65600 and gqa.wte.weight.shape == gqa.lm_head.weight.shape == (65600, 1280)
    assert gqa.blocks[0].attn.c_q.weight.shape == (10 * 128, 1280)
    assert gqa.blocks[0].attn.c_k.weight.shape == (5 * 128, 1280)  # 5 kv heads shared by 10 query heads
    # The shape's rules are ModelConfig's: a GPT is never built from an invalid one.
    with pytest.raises(ConfigError, match="n-kv-head"):
        ModelConfig(**{**SMALL, "n_kv_head": 3})
    with pytest.raises(ConfigError, match="even"):
        ModelConfig(**{**SMALL, "head_dim": 15})


def test_same_seed_same_weights_and_training_numbers_as_before():
    """Numbers recorded with the model as it was before it was built from ModelConfig (GPTConfig):
    the parameter names checkpoints hold, the initial weights a seed draws (module and init order),
    and the training path's loss and gradients (is_causal attention, no mask)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL), VOCAB)
    per_block = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_gate", "mlp.c_proj"]
    assert list(model.state_dict()) == ["wte.weight", *[f"blocks.{i}.{name}.weight" for i in range(2)
                                                         for name in per_block], "lm_head.weight"]
    with torch.no_grad():
        for got, want in [(model.wte.weight[5, :3], [-2.33018160, -1.01727808, 1.22618127]),
                          (model.blocks[0].attn.c_v.weight[3, :3], [-0.07795545, -0.05169534, -0.12851351]),
                          (model.blocks[1].mlp.c_gate.weight[0, :3], [0.01141287, -0.20230837, -0.00377587]),
                          (model.lm_head.weight[7, :2], [-0.00057892, 0.00153671])]:
            torch.testing.assert_close(got, torch.tensor(want), atol=1e-7, rtol=1e-6)
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    assert model(x, x).item() == pytest.approx(4.606242656707764, rel=1e-6)

    model = active_model().train()
    loss = model(x, x.roll(-1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(9.032028198242188, rel=1e-5)
    assert model.blocks[0].attn.c_q.weight.grad.norm().item() == pytest.approx(1.5841827392578125, rel=1e-4)
    assert model.wte.weight.grad.norm().item() == pytest.approx(5.544256687164307, rel=1e-4)


def test_init_zero_output_projections_and_uniform_predictions():
    model = GPT(ModelConfig(**SMALL), VOCAB)
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


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_causality(overrides):
    model = active_model(**overrides)
    x = torch.randint(0, 100, (2, 32))
    base = model(x)
    for t in (0, 11, 31):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 100
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])  # the changed token itself does matter


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_kv_cache_prefill_and_decode_equal_full_forward(overrides):
    model = active_model(**overrides)
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
        model.new_kv_cache(1, model.max_positions + 1)
    with pytest.raises(NanochatError, match="longer than the model's 128 positions"):
        model(torch.zeros(1, model.max_positions + 1, dtype=torch.long))


def test_kv_cache_positions_and_mask():
    # No pad slots: positions are the slots; the first chunk is causal, one token sees every slot.
    cache = KVCache(1, 2, 1, 10, 4)
    assert cache.positions_and_mask(4) == (slice(0, 4), None, True)
    cache.pos = 4
    assert cache.positions_and_mask(1) == (slice(4, 5), None, False)
    positions, mask, is_causal = cache.positions_and_mask(3)  # a later chunk needs the explicit causal mask
    assert positions.tolist() == [[[4, 5, 6]]] * 2 and not is_causal
    assert mask.shape == (2, 1, 3, 7)
    assert mask[0, 0].tolist() == [[True] * (5 + i) + [False] * (2 - i) for i in range(3)]

    # Row 0 left-padded by 2: its positions start at its first real token and its pad slots are hidden,
    # except from themselves (a softmax row with nothing to see would be NaN).
    cache = KVCache(1, 2, 1, 10, 4, pad=torch.tensor([2, 0]))
    positions, mask, is_causal = cache.positions_and_mask(4)
    assert positions.tolist() == [[[0, 0, 0, 1]], [[0, 1, 2, 3]]] and not is_causal
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    cache.pos = 10
    with pytest.raises(NanochatError, match="KV cache full"):
        cache.positions_and_mask(1)


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_slot_cache_passes_mix_decodes_and_prompt_chunks_each_row_as_alone(overrides):
    """Passes over a SlotCache carry, packed into one row, one token for some rows and a chunk for
    others (a first chunk, a later one, a one-token prompt), the rows in any order: every row's
    logits equal its sequence's full forward alone. `copy` hands a sequence to another row, which
    goes its own way from there; `logits_at` returns just the positions asked for."""
    model = active_model(**overrides)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (14,), generator=g).tolist() for _ in range(4)]
    passes = [[(3, 6), (0, 5)], [(0, 1), (3, 2), (1, 9)], [(2, 1), (0, 4), (1, 1), (3, 1)],
              [(1, 1), (4, 2), (0, 1), (3, 3)], [(0, 1), (4, 1), (1, 1), (2, 1), (3, 1)]]  # (row, tokens) per pass
    cache = model.new_slot_cache(5, 20)
    fed = [0] * 5  # tokens each row holds
    got: list[list[torch.Tensor]] = [[] for _ in range(5)]  # each row's logits, pass after pass
    with torch.no_grad():
        for i, plan in enumerate(passes):
            if i == 3:  # row 4 takes a copy of row 1 (10 tokens) and continues it with tokens of its own
                cache.copy(1, 4)
                seqs.append(seqs[1][:10] + [7, 8, 9])
                fed[4] = 10
            ids, last = cache.schedule([(row, seqs[row][fed[row]:fed[row] + n]) for row, n in plan])
            if i < len(passes) - 1:
                logits = model(ids, kv_cache=cache)[0]
                rows = [logits[end - n + 1:end + 1] for (_, n), end in zip(plan, last, strict=True)]
            else:  # one token a row: the logits of each row's last token only
                logits = model(ids, kv_cache=cache, logits_at=torch.tensor(last))[0]
                assert logits.shape == (len(plan), VOCAB)
                rows = logits.split(1)
            for (row, n), x in zip(plan, rows, strict=True):
                got[row].append(x)
                fed[row] += n
    assert cache.lengths == fed == [12, 12, 2, 13, 13]
    for row, seq in enumerate(seqs):
        full = model(torch.tensor([seq[:fed[row]]]))[0]
        first = 10 if row == 4 else 0  # the copy's own tokens
        torch.testing.assert_close(torch.cat(got[row]), full[first:], atol=1e-5, rtol=1e-5)


def test_slot_cache_rows_stay_themselves_while_its_columns_run_out_move_and_grow(monkeypatch):
    """Sequences come and go for many passes (prompts whole or in chunks, rows that skip a pass,
    one copied to another row): the shared columns run out again and again, every sequence moves
    back to the start of the cache, which grows, and each row's logits still equal its sequence's
    forward alone."""
    monkeypatch.setattr(SlotCache, "first_columns", 4)
    model = active_model()
    slots, max_len = 3, 24
    cache = model.new_slot_cache(slots, max_len)
    r = random.Random(5)
    seqs: list[list[int]] = [[] for _ in range(slots)]  # each row's sequence so far
    wanted = [0] * slots  # how long each row's sequence is to be
    got: list[list[torch.Tensor]] = [[] for _ in range(slots)]  # each row's logits, this sequence
    first = [0] * slots  # the first position of a row's sequence it computed logits for (a copy: after the copied part)
    columns, widths, checked = [], [cache.k.size(3)], 0
    with torch.no_grad():
        for _ in range(200):
            feeds = []
            for row in range(slots):
                if len(seqs[row]) == wanted[row]:  # done (or empty): check it against the sequence alone, start anew
                    if seqs[row]:
                        full = model(torch.tensor([seqs[row]]))[0]
                        torch.testing.assert_close(torch.cat(got[row]), full[first[row]:], atol=1e-5, rtol=1e-5)
                        checked += 1
                    cache.reset(row)
                    seqs[row], got[row], wanted[row], first[row] = [], [], r.randint(2, max_len), 0
                if r.random() < 0.15:  # this row sits out a pass
                    continue
                n = 1 if seqs[row] else r.randint(1, min(8, wanted[row]))  # a prompt (or its first chunk), or one token
                if 0 < len(seqs[row]) < 6 and r.random() < 0.3:  # a later chunk of it
                    n = min(r.randint(2, 4), wanted[row] - len(seqs[row]))
                new = [r.randrange(VOCAB) for _ in range(n)]
                feeds.append((row, new))
                seqs[row] += new
            if not feeds:
                continue
            ids, last = cache.schedule(feeds)
            logits = model(ids, kv_cache=cache)[0]
            for (row, new), end in zip(feeds, last, strict=True):
                got[row].append(logits[end - len(new) + 1:end + 1])
            columns.append(cache.column)
            widths.append(cache.k.size(3))
            if r.random() < 0.1:  # a finished prompt's copy in another row, which then goes its own way
                src, dst = r.sample(range(slots), 2)
                if seqs[src] and len(seqs[src]) < wanted[src]:
                    cache.copy(src, dst)
                    seqs[dst], wanted[dst], got[dst], first[dst] = list(seqs[src]), wanted[src], [], len(seqs[src])
    assert checked >= 25
    assert sum(b < a for a, b in itertools.pairwise(columns)) >= 5  # the columns ran out and the rows moved back
    assert widths[0] == 4 and widths[-1] == 2 * max_len and len(set(widths)) > 2  # it grew step by step


def test_slot_cache_refuses_what_does_not_fit_or_was_not_scheduled():
    model = active_model()
    cache = model.new_slot_cache(2, 8)
    with pytest.raises(ValueError, match="at most once"):
        cache.schedule([(0, [1]), (0, [2])])
    with pytest.raises(ValueError, match="no tokens"):
        cache.schedule([(0, [])])
    with pytest.raises(NanochatError, match="KV cache full"):
        cache.schedule([(1, list(range(9)))])
    ids, _ = cache.schedule([(1, [1, 2, 3])])
    with pytest.raises(NanochatError, match="its `schedule` returned"), torch.no_grad():
        model(ids[:, :2], kv_cache=cache)
    with pytest.raises(NanochatError, match="rotary positions"):
        model.new_slot_cache(1, model.max_positions + 1)


def _saved_numels(fn):
    """Run fn() and return the sizes of the tensors autograd saved for the backward pass."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_chunked_head_loss_equals_the_plain_loss_and_gradients(softcap):
    torch.manual_seed(0)
    N, C, V = 300, 32, 500  # chunks of 64 rows: the last one is partial
    h = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.3).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[::7] = -1
    t[64:128] = -1  # a whole chunk with nothing to learn
    plain, plain_saved = _saved_numels(lambda: head_loss(h, w, t, softcap, max_elements=N * V))
    (plain * 0.5).backward()
    expect = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    chunked, chunked_saved = _saved_numels(lambda: head_loss(h, w, t, softcap, max_elements=64 * V))
    (chunked * 0.5).backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, expect[0])  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    torch.testing.assert_close(w.grad, expect[1])
    with torch.no_grad():  # evaluation: chunked too, no gradients
        torch.testing.assert_close(head_loss(h, w, t, softcap, max_elements=64 * V), plain, rtol=1e-6, atol=0)
    assert max(plain_saved) >= N * V  # the plain path keeps N×V logits for its backward …
    assert max(chunked_saved) < N * V // 2  # … the chunked one never does


def test_model_with_a_chunked_loss_trains_as_with_the_plain_one(monkeypatch):
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=32), 300)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 300, (4, 33))
    idx, targets = x[:, :-1], x[:, 1:].clone()
    targets[0, :9] = -1

    def loss_and_grads(run):
        model.zero_grad()
        loss = run(idx, targets, loss_reduction="sum")
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain = loss_and_grads(model)
    monkeypatch.setattr(gpt_module, "LOSS_CHUNK_ELEMENTS", 40 * 300)  # 128 rows → 4 chunks, the last partial
    for run in (model, torch.compile(model, backend="aot_eager")):  # and traced through the compiler
        loss, grads = loss_and_grads(run)
        torch.testing.assert_close(loss, plain[0], rtol=1e-6, atol=0)
        for got, expect in zip(grads, plain[1], strict=True):
            torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)


def test_bf16_autocast_forward_backward_and_cache():
    model = active_model().train()
    x = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.new_kv_cache(2, 17).k.dtype == torch.float32  # no autocast: the weights' dtype
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_kv_cache(2, 17)  # by default the autocast dtype: half fp32's memory
        assert cache.k.dtype == cache.v.dtype == torch.bfloat16
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


def test_eval_mode_restores_the_mode_it_found_even_on_an_exception():
    model = active_model()
    for training in (True, False):
        model.train(training)
        with pytest.raises(RuntimeError), eval_mode(model):
            assert not model.training
            raise RuntimeError("boom")
        assert model.training is training
    model.eval()
    model.blocks[0].train()  # one submodule left training: the block still runs wholly in eval mode
    with eval_mode(model):
        assert not any(m.training for m in model.modules())


def test_value_embeddings_and_x0_skip_shapes_init_and_optimizer_groups():
    from nanochat.optim import param_groups

    plain = GPT(ModelConfig(**{**SMALL, "depth": 3}), VOCAB)
    model = GPT(ModelConfig(**{**SMALL, "depth": 3, "value_embeddings": True, "x0_skip": True}), VOCAB)
    assert sorted(model.value_embeds) == ["0", "2"]  # the last layer and every other one below it
    assert model.value_embeds["2"].weight.shape == (128, 2 * 16)  # padded vocabulary × kv_heads·head_dim
    assert model.resid_lambdas.tolist() == [1.0] * 3 and model.x0_lambdas.tolist() == [0.0] * 3
    extra = 2 * 128 * 32 + 2 * 3
    assert model.num_params() == plain.num_params() + extra
    assert model.num_params(exclude_embeddings=True) == plain.num_params(exclude_embeddings=True) + 6
    groups = param_groups(model)
    assert {id(p) for p in groups["embedding"]} == {id(model.wte.weight)} | {
        id(ve.weight) for ve in model.value_embeds.values()}
    assert {id(model.resid_lambdas), id(model.x0_lambdas)} <= {id(p) for p in groups["scalar"]}
    x = torch.randint(0, VOCAB, (2, 8))
    assert model(x).shape == (2, 8, VOCAB)
    # At init both parts are silent: zero output projections mute the values, x0 starts at weight 0.
    torch.manual_seed(0)
    a = GPT(ModelConfig(**{**SMALL, "x0_skip": True}), VOCAB)
    torch.manual_seed(0)
    b = GPT(ModelConfig(**SMALL), VOCAB)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_smear_and_bigram_shapes_init_and_optimizer_groups():
    from nanochat.optim import param_groups

    plain = GPT(ModelConfig(**SMALL), VOCAB)
    model = GPT(ModelConfig(**{**SMALL, "smear": True, "bigram_multiple": 3}), VOCAB)
    assert model.bigram_embed.weight.shape == (3 * 128, 64)  # 3 rows per padded-vocabulary row, n_embd wide
    assert model.num_params() == plain.num_params() + 3 * 128 * 64 + 17  # the table; 16 gate weights + strength
    assert model.num_params(exclude_embeddings=True) == plain.num_params(exclude_embeddings=True) + 17
    groups = param_groups(model)
    assert any(p is model.bigram_embed.weight for p in groups["embedding"])  # AdamW, not Muon
    assert any(p is model.smear_gate for p in groups["scalar"])
    # At init both are silent (zero table, zero smear strength): the plain model's outputs, same weights.
    model.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(model(x), plain(x), atol=1e-6, rtol=0)  # up to re-normalising a unit-RMS input


def test_bigram_embedding_reads_the_pair_of_previous_and_current_token():
    model = active_model(bigram_multiple=2)
    x = torch.tensor([[5, 9, 17, 30, 41, 52]])
    twin = x.clone()
    twin[0, 2] = 18
    with torch.no_grad():
        model.wte.weight[18] = model.wte.weight[17]  # token 18 embeds exactly like 17: only the pairs differ
        a = model._add_previous_token(x, norm(model.wte(x)), None)
        b = model._add_previous_token(twin, norm(model.wte(twin)), None)
    changed = [not torch.allclose(a[0, t], b[0, t]) for t in range(6)]
    assert changed == [False, False, True, True, False, False]  # the pairs (9, 17→18) and (17→18, 30)


def test_weighted_loss_scales_each_position_plain_and_chunked(monkeypatch):
    """loss_weights (RL's advantages, negative too) weight each position's cross-entropy, with the same
    loss and gradients on the plain and the chunked path; without weights nothing changes."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=1, aspect_ratio=32, head_dim=32, sequence_len=16), 300)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 300, (4, 17))
    idx, targets = x[:, :-1], x[:, 1:].clone()
    targets[1, :5] = -1
    weights = torch.randn(4, 16)

    def loss_and_grads(**kw):
        model.zero_grad()
        loss = model(idx, targets, loss_reduction="sum", **kw)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    with torch.no_grad():
        per_position = F.cross_entropy(model(idx).flatten(0, 1), targets.reshape(-1), ignore_index=-1,
                                       reduction="none")
    plain = loss_and_grads(loss_weights=weights)
    torch.testing.assert_close(plain[0], (per_position * weights.reshape(-1)).sum(), rtol=1e-5, atol=1e-5)
    ones = loss_and_grads(loss_weights=torch.ones(4, 16))
    unweighted = loss_and_grads()
    torch.testing.assert_close(ones[0], unweighted[0])
    monkeypatch.setattr(gpt_module, "LOSS_CHUNK_ELEMENTS", 20 * 300)  # 64 rows → 4 chunks
    chunked = loss_and_grads(loss_weights=weights)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    for got, expect in zip(chunked[1], plain[1], strict=True):
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    with torch.no_grad():  # the evaluation path (no gradients) weights the same way
        torch.testing.assert_close(model(idx, targets, loss_reduction="sum", loss_weights=weights), plain[0],
                                   rtol=1e-5, atol=1e-5)
