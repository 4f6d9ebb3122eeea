"""The RL stage (nanochat/train/rl.py): advantages, where the loss falls, the sharded step, and the
stage through the shared loop (resume included)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from _hub_stub import stub_hub
from _rl_step import fixed_step
from _tiny_model import tiny_gpt

from nanochat.checkpoint import read_meta
from nanochat.config import DeviceConfig, EvalConfig, OptimConfig, RLConfig
from nanochat.errors import NanochatError
from nanochat.evaluate.cli import evaluate_stage
from nanochat.evaluate.passk import sample_seed
from nanochat.metrics import read_metrics
from nanochat.optim import build_optimizer
from nanochat.runs import latest
from nanochat.runtime import init_runtime
from nanochat.tasks import rewards
from nanochat.train import loop
from nanochat.train.loop import train_step
from nanochat.train.rl import group_advantages, rollout_rows, train_rl, update_batches
from tests._chat_model import make_chat_model

RT = init_runtime(device="cpu", dtype="float32")


def test_group_advantages_for_a_hand_made_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    centred = group_advantages(rewards)
    assert centred.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [0.75, -0.25, -0.25, -0.25]]
    scaled = group_advantages(rewards, normalise=True)
    torch.testing.assert_close(scaled[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), rtol=1e-5, atol=1e-5)
    assert scaled[1].tolist() == [0.0] * 4  # a group of equal rewards teaches nothing, normalised or not
    std = rewards[2].std(unbiased=False)
    torch.testing.assert_close(scaled[2], centred[2] / std, rtol=1e-5, atol=1e-5)


def test_loss_falls_only_on_the_tokens_the_model_sampled():
    prompts = [[1, 2, 3], [4, 5]]
    # row 0: sampled 7, 8, then a forced tool output 9, 10, then sampled 11; row 1: sampled 12, 13
    rollouts = [([7, 8, 9, 10, 11], [True, True, False, False, True]), ([12, 13], [True, True])]
    x, y, w = rollout_rows(prompts, rollouts, [0.5, -1.5], torch.device("cpu"))
    assert x.tolist() == [[1, 2, 3, 7, 8, 9, 10], [4, 5, 12, 13, 0, 0, 0]]
    # targets: never a prompt token, never a forced one, never padding
    assert y.tolist() == [[-1, -1, 7, 8, -1, -1, 11], [-1, 12, 13, -1, -1, -1, -1]]
    assert w[0].unique().tolist() == [0.5] and w[1].unique().tolist() == [-1.5]
    # a forced token's loss really is excluded: changing what was forced changes no target
    forced = rollout_rows(prompts, [([7, 8, 99, 98, 11], rollouts[0][1]), rollouts[1]], [0.5, -1.5],
                          torch.device("cpu"))[1]
    assert torch.equal(forced, y)


def test_one_rl_step_on_two_ranks_equals_one_process(tmp_path):
    worker = Path(__file__).with_name("_dist_rl_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, OptimConfig(), total_batch_tokens=8 * 16)
    prompts, rollouts, advantages = fixed_step()
    halves = [rollout_rows(prompts[i::2], rollouts[i::2], advantages[i::2], RT.device) for i in range(2)]
    loss, count = train_step(model, opt, iter(halves), accum_steps=2, rt=RT)
    assert count == sum(sum(c) for _, c in rollouts)  # every sampled token, and only those
    sharded = torch.load(tmp_path / "rl.pt")
    changed = 0
    for name, p in model.state_dict().items():
        assert torch.allclose(p, sharded[name], atol=1e-5, rtol=0), name
        changed += not torch.equal(p, before[name])
    assert changed > 0


def test_rows_with_zero_advantage_skip_the_passes_but_not_the_normaliser():
    prompts, rollouts, advantages = fixed_step()
    advantages = advantages[:4] + [0.0] * 4  # the second group all scored alike
    sampled = sum(sum(chosen) for _, chosen in rollouts)
    for parts in (1, 2):
        full, skipping = tiny_gpt(), tiny_gpt()
        opts = [build_optimizer(m, OptimConfig(), total_batch_tokens=8 * 16) for m in (full, skipping)]
        every_row = [rollout_rows(prompts[i::parts], rollouts[i::parts], advantages[i::parts], RT.device)
                     for i in range(parts)]
        batches, updated = update_batches(prompts, rollouts, advantages, parts, RT.device)
        assert updated == 4 and sum(len(b[0]) for b in batches) == 4 and len(batches) == parts
        # a step where nothing teaches still runs one row per micro-batch (the optimizer's momentum moves on)
        idle, idle_rows = update_batches(prompts, rollouts, [0.0] * 8, parts, RT.device)
        assert idle_rows == parts and sum(int(b[3]) for b in idle) == sampled
        every_idle = [rollout_rows(prompts[i::parts], rollouts[i::parts], [0.0] * (8 // parts), RT.device)
                      for i in range(parts)]
        for model, opt, steps in ((full, opts[0], (every_row, every_idle)), (skipping, opts[1], (batches, idle))):
            for step in steps:
                loss, count = train_step(model, opt, iter(step), accum_steps=parts, rt=RT)
                assert count == sampled
        for name, p in full.state_dict().items():
            torch.testing.assert_close(skipping.state_dict()[name], p, rtol=0, atol=1e-6, msg=name)
        start = tiny_gpt().state_dict()
        assert any(not torch.equal(p, start[name]) for name, p in skipping.state_dict().items())


def test_sample_seeds_depend_on_the_place_in_the_run_alone():
    seeds = {sample_seed(1, step, q, s) for step in range(3) for q in range(4) for s in range(4)}
    assert len(seeds) == 48 and sample_seed(1, 2, 3, 0) == sample_seed(1, 2, 3, 0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    make_chat_model(run="r", tokenizer="r", stage="sft", sequence_len=128)
    # The untrained model never answers right; a reward that varies with the reply gives the
    # policy gradient something to follow, so that resuming has weights to get right.
    monkeypatch.setitem(rewards.REWARDS, "arithmetic", lambda reply, conv: float(len(reply.text) % 2))
    return tmp_path


def rl_config(**overrides) -> RLConfig:
    cfg = RLConfig(run="r", tasks="arithmetic", prompts_per_step=2, samples=4, max_tokens=12, micro_batch=4,
                   max_steps=3, save_every=1, keep_last=5, eval_items=4, eval_samples=2,
                   runtime=DeviceConfig(device="cpu", dtype="float32"), optim=OptimConfig(reference_batch_tokens=96))
    return dataclasses.replace(cfg, **overrides)


def test_rl_stage_learns_logs_rewards_and_resumes_to_the_same_weights(home, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(NanochatError, match="no SFT checkpoint"):
        train_rl(dataclasses.replace(rl_config(), run="missing"), RT)
    summary = train_rl(rl_config(), RT)
    assert summary["start_from"] == "sft" and summary["steps"] == 3
    assert {"arithmetic_pass@1", "arithmetic_pass@2", "before_arithmetic_pass@1"} <= summary.keys()
    records = [r for r in read_metrics(home / "runs" / "r" / "metrics.jsonl") if r.get("stage") == "rl"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(0 <= r["reward"] <= 1 for r in records if "loss" in r)
    assert records[0]["step"] == 0 and "before_arithmetic_pass@1" in records[0]  # measured before step 1
    straight = load_file(latest("r", "rl") / "model.safetensors")
    meta = read_meta(latest("r", "rl"))
    assert meta["stage"] == "rl" and meta["final"] and meta["start_from"] == "sft"
    # `nanochat eval` measures the saved SFT and RL models with RL's saved settings: what RL measured
    evaluated = {stage: evaluate_stage(stage, EvalConfig(run="r", chat_tasks=("arithmetic",), max_items=2), RT)[0]
                 for stage in ("sft", "rl")}
    for key in ("arithmetic_pass@1", "arithmetic_pass@2"):
        assert (evaluated["sft"][key], evaluated["rl"][key]) == (meta[f"before_{key}"], meta[key])
    assert 0 < meta["arithmetic_pass@2"] < 1  # a figure the sampling decides, not a constant
    no_passk = evaluate_stage("rl", EvalConfig(run="r", chat_tasks=("arithmetic",), max_items=2, pass_at_k=False), RT)
    assert "arithmetic_pass@1" not in no_passk[0]

    # the same run, interrupted after step 2 and resumed, ends with the same weights
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "again"))
    make_chat_model(run="r", tokenizer="r", stage="sft", sequence_len=128)
    calls, real = {"n": 0}, loop.train_step

    def stop_at_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        train_rl(rl_config(), RT)
    monkeypatch.setattr(loop, "train_step", real)
    assert read_meta(latest("r", "rl"))["step"] == 2
    train_rl(rl_config(resume=True), RT)
    resumed = load_file(latest("r", "rl") / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert any(not torch.equal(straight[k], load_file(
        latest("r", "sft") / "model.safetensors")[k]) for k in straight)  # RL moved the weights
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_rl_runs_on_gsm8k_the_gpu_presets_task(home, monkeypatch):
    # the GPU presets' task, from a stand-in for the hub: its reward and held-out split are wired up
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a, b in ((3, 4), (5, 6), (2, 9), (7, 1))]
    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    calls = stub_hub(monkeypatch, home, {("openai/gsm8k", f"main/{split}-00000-of-00001.parquet"): (schema, rows)
                                         for split in ("train", "test")})
    summary = train_rl(rl_config(tasks="gsm8k", max_steps=1, save_every=0), RT)
    assert summary["steps"] == 1 and {"gsm8k_pass@1", "gsm8k_pass@2", "before_gsm8k_pass@1"} <= summary.keys()
    assert {filename.split("/")[1].split("-")[0] for _, filename in calls} == {"train", "test"}
