import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_model import fixed_rows, tiny_gpt

from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.config import ConfigError, OptimConfig
from nanochat.optim import Muon, apply_schedule, build_optimizer, lr_multiplier, orthogonalize, param_groups
from nanochat.runtime import init_runtime
from nanochat.train.loop import grad_accum_steps, train_step

RT = init_runtime(device="cpu", dtype="float32")  # accumulation math, not bf16 rounding


@pytest.mark.parametrize("shape", [(512, 128), (128, 512), (384, 384), (4, 96, 48)])
def test_orthogonalize_brings_singular_values_near_one(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(G, steps=5).float())
    assert s.max() < 1.2
    # Rectangular Gaussian matrices are well conditioned: every singular value lands near 1.
    # A square one has singular values down to ~1/n of its largest; 5 steps leave the tiniest few
    # behind, more steps reach them too.
    in_band = ((s > 0.8) & (s < 1.2)).float().mean()
    assert in_band == 1.0 if shape[-1] != shape[-2] else in_band > 0.98
    s10 = torch.linalg.svdvals(orthogonalize(G, steps=10).float())
    assert ((s10 > 0.9) & (s10 < 1.15)).all()


def test_orthogonalize_matches_the_polar_factor():
    G = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    approx = orthogonalize(G, steps=10, dtype=torch.float32)
    assert torch.nn.functional.cosine_similarity(approx.flatten(), (U @ Vh).flatten(), dim=0) > 0.99


def test_grouping_puts_each_tensor_where_intended():
    model = tiny_gpt()
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    matrix = {names[id(p)] for p in groups["matrix"]}
    assert matrix == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    # token, value (the default: the last layer and every other one below it) and bigram embeddings;
    # the smear gate is a vector
    assert [names[id(p)] for p in groups["embedding"]] == ["wte.weight", "value_embeds.1.weight", "bigram_embed.weight"]
    assert any(p is model.smear_gate for p in groups["scalar"])
    assert [names[id(p)] for p in groups["unembedding"]] == ["lm_head.weight"]
    assert all(p.ndim < 2 for p in groups["scalar"])
    assert sum(map(len, groups.values())) == len(list(model.parameters()))
    with_emb = param_groups(model, muon_embeddings=True)
    assert any(p is model.wte.weight for p in with_emb["matrix"])
    assert [names[id(p)] for p in with_emb["embedding"]] == ["value_embeds.1.weight", "bigram_embed.weight"]  # AdamW
    opt = build_optimizer(model, OptimConfig(), total_batch_tokens=2**19)
    muon = opt.optimizers[0]
    assert isinstance(muon, Muon)
    assert all(p.ndim == 2 and p is not model.wte.weight for g in muon.param_groups for p in g["params"])
    adamw_only = build_optimizer(model, OptimConfig(optimizer="adamw"), total_batch_tokens=2**19)
    assert [type(o).__name__ for o in adamw_only.optimizers] == ["AdamW"]


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def fp32_optimizer(model, **cfg):
    opt = build_optimizer(model, OptimConfig(**cfg), total_batch_tokens=8 * 16)
    for group in opt.optimizers[0].param_groups:
        group["ns_dtype"] = "float32"  # compare accumulation math, not bf16 rounding
    return opt


def run(model, opt, micro_batch, steps=3):
    for step in range(steps):
        x, y = fixed_rows(8, seed=step)
        chunks = [(x[i:i + micro_batch], y[i:i + micro_batch]) for i in range(0, 8, micro_batch)]
        train_step(model, opt, iter(chunks), accum_steps=len(chunks), rt=RT)
    return model


def assert_same_weights(a, b, atol=1e-5):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=atol, rtol=0), name


def test_accumulation_one_by_eight_equals_eight_by_one():
    a = tiny_gpt()
    b = tiny_gpt()
    run(a, fp32_optimizer(a), micro_batch=1)  # 8 micro-steps of 1 row
    run(b, fp32_optimizer(b), micro_batch=8)  # 1 micro-step of 8 rows
    assert_same_weights(a, b)


def test_accum_steps_arithmetic_and_refusal():
    assert grad_accum_steps(524288, 32, 2048, 8) == 1
    assert grad_accum_steps(524288, 32, 2048, 1) == 8
    with pytest.raises(ConfigError, match="--micro-batch"):
        grad_accum_steps(524288, 24, 2048, 1)


def test_zero_supervised_tokens_give_a_finite_loss_and_no_step():
    model = tiny_gpt()
    before = [p.clone() for p in model.parameters()]
    opt = fp32_optimizer(model)
    x, y = fixed_rows(2)
    loss, count = train_step(model, opt, iter([(x, torch.full_like(y, -1))]), accum_steps=1, rt=RT)
    assert (loss, count) == (0.0, 0)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def optimizer_state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for o in opt.optimizers for s in o.state.values()
               for t in s.values() if torch.is_tensor(t) and t.ndim > 0)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_optimizer_equals_single_process(tmp_path, world):
    worker = Path(__file__).with_name("_dist_optim_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(worker),
           str(tmp_path), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tiny_gpt()
    opt = build_optimizer(single, OptimConfig(), total_batch_tokens=4 * 16)
    before = {k: v.clone() for k, v in single.named_parameters()}
    for step in range(3):
        x, y = fixed_rows(4, seed=step)
        train_step(single, opt, iter([(x[:2], y[:2]), (x[2:], y[2:])]), accum_steps=2, rt=RT)
    sharded = torch.load(tmp_path / "sharded.pt")
    for name, p in single.state_dict().items():
        assert torch.allclose(p, sharded[name], atol=1e-5, rtol=0), name
    assert all(not torch.equal(p, before[name]) for name, p in single.named_parameters())  # all trained
    # Each rank keeps state for its share only: 1/W of one process's, give or take one matrix's
    # momentum (Muon hands out whole matrices) and the replicated vectors.
    per_rank = [torch.load(tmp_path / f"state{r}.pt") for r in range(world)]
    total = optimizer_state_bytes(opt)
    one_matrix = max(s["momentum_buffer"].nbytes for s in opt.optimizers[0].state.values())
    assert sum(per_rank) == pytest.approx(total, rel=0.01), (per_rank, total)
    assert max(per_rank) <= total / world + one_matrix, (per_rank, total, one_matrix)


def test_optimizer_state_survives_checkpoint(tmp_path):
    model = tiny_gpt()
    opt = build_optimizer(model, OptimConfig(), total_batch_tokens=8 * 16)
    run(model, opt, micro_batch=4, steps=2)
    path = save_checkpoint(tmp_path, 2, model, optimizer=opt)
    x, y = fixed_rows(8, seed=99)
    train_step(model, opt, iter([(x, y)]), accum_steps=1, rt=RT)

    resumed = tiny_gpt(seed=7)
    opt2 = build_optimizer(resumed, OptimConfig(), total_batch_tokens=8 * 16)
    load_checkpoint(path, resumed, opt2)
    train_step(resumed, opt2, iter([(x, y)]), accum_steps=1, rt=RT)
    for p, q in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)  # bitwise: momentum buffers and Adam moments came back


def test_schedule_warmup_constant_warmdown():
    cfg = OptimConfig(warmup_frac=0.1, warmdown_frac=0.5, final_lr_frac=0.1)
    mults = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == pytest.approx(1.0)
    assert all(m == 1.0 for m in mults[10:50])
    assert mults[99] == pytest.approx(0.1 + 0.9 * 0.02)
    assert all(a >= b for a, b in zip(mults[50:], mults[51:], strict=False))
    model = tiny_gpt()
    opt = build_optimizer(model, cfg, total_batch_tokens=2**19)
    apply_schedule(opt, 99, 100, cfg)
    assert all(g["lr"] == pytest.approx(g["base_lr"] * mults[99]) for g in opt.param_groups)
    assert opt.optimizers[0].param_groups[0]["momentum"] == pytest.approx(0.85 + 0.1 * 99 / 300)


def test_muon_refinements_normuon_cautious_decay_and_momentum_cooldown():
    from nanochat.config import OptimConfig
    from nanochat.optim import Muon, muon_momentum

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    w.grad = torch.randn(8, 4)
    before = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5, cautious_wd=True, normuon=True,
               ns_dtype="float32")
    opt.step()
    u = (before - w.detach()) / 0.1  # decay + scaled update; the plain orthogonal update for comparison:
    plain = torch.nn.Parameter(before.clone())
    plain.grad = w.grad.clone()
    Muon([plain], lr=0.1, momentum=0.0, nesterov=False, ns_dtype="float32").step()
    orth = (before - plain.detach()) / 0.1
    # NorMuon keeps the update's overall norm; the cautious decay touches only weights the update shrinks.
    decayed = before * 0.05 * (u * before > 0)
    assert torch.allclose((u * 0.1 - decayed).norm(), (orth * 0.1).norm(), rtol=1e-4)
    assert opt.state[w]["row_second_moment"].shape == (8, 1)
    cfg = OptimConfig(muon_momentum_warmup=10, muon_momentum_cooldown=True)
    assert muon_momentum(20, cfg, lr_mult=1.0) == pytest.approx(0.95)
    assert muon_momentum(20, cfg, lr_mult=0.0) == pytest.approx(0.85)
    assert muon_momentum(20, OptimConfig(muon_momentum_warmup=10), lr_mult=0.0) == pytest.approx(0.95)


def test_step_rates_count_attention_at_the_rows_real_width():
    """The chat stages' rows are narrower than the sequence length: a step's FLOPs add up each
    batch's rows × width × FLOPs per token at that width, not at the model's sequence length."""
    from nanochat.train.loop import _Counted, step_rates

    model = tiny_gpt()
    rows = [(torch.zeros(2, 5, dtype=torch.long), None), (torch.zeros(3, 16, dtype=torch.long), None)]
    batches = _Counted(iter(rows))
    next(batches), next(batches)
    positions, flops = batches.take(model, world_size=2)
    assert positions == 2 * (2 * 5 + 3 * 16)
    assert flops == 2 * (2 * 5 * model.flops_per_token(5) + 3 * 16 * model.flops_per_token(16))
    assert flops < positions * model.flops_per_token()  # less than counting every row at full width
    assert batches.take(model, world_size=2) == (0, 0)  # each step counts its own batches
    tok_per_s, mfu = step_rates(positions, flops, 0.5, RT)
    assert tok_per_s == 2 * positions and mfu is None  # no known peak on a CPU
