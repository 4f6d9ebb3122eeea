import math
import os
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from nanochat.checkpoint import latest_checkpoint, read_meta
from nanochat.config import ConfigError, DeviceConfig, ModelConfig, OptimConfig, TrainConfig, tokenizer_dir
from nanochat.data import offline
from nanochat.errors import NanochatError
from nanochat.runtime import init_runtime
from nanochat.tokenizer import Tokenizer
from nanochat.train import loop
from nanochat.train import pretrain as pretrain_mod
from nanochat.train.pretrain import pretrain

RT = init_runtime(device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real corpus (offline Wikipedia summaries) and a 512-token tokenizer trained on it."""
    home = tmp_path_factory.mktemp("home")
    texts = [a["text"] for a in offline.load_articles() if a["lang"] == "en-us"][:1600]
    folder = home / "corpus"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": texts[i * 500:(i + 1) * 500]}), folder / f"part{i}.parquet",
                       row_group_size=100)
    pq.write_table(pa.table({"text": texts[1500:]}), folder / "part9_val.parquet")
    os.environ["NANOCHAT_HOME"] = str(home)
    Tokenizer.train(texts[:1500], 512).save(tokenizer_dir("t"))
    yield folder
    del os.environ["NANOCHAT_HOME"]


def config(corpus, run, **overrides):
    base = dict(run=run, tokenizer="t", data=str(corpus), runtime=DeviceConfig(device="cpu"), seed=3,
                model=ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=32),
                total_batch_tokens=2 * 4 * 32, micro_batch=4, max_steps=12, eval_every=0, save_every=4,
                eval_tokens=1024, keep_last=5, compile=False)
    base.update(overrides)
    base.setdefault("optim", OptimConfig(reference_batch_tokens=base["total_batch_tokens"]))
    return TrainConfig(**base)


def final_weights(run_name):
    from nanochat.config import run_dir

    return load_file(latest_checkpoint(run_dir(run_name)) / "model.safetensors")


def interrupt_at(monkeypatch, call, exc=KeyboardInterrupt, nan=False):
    real = loop.train_step
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            if nan:
                real(*args, **kwargs)
                return float("nan"), 0
            raise exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", wrapped)


def test_resume_after_interruption_is_bitwise_identical(corpus, monkeypatch):
    pretrain(config(corpus, "straight"), RT)
    interrupt_at(monkeypatch, call=7)  # dies during step 7; the last checkpoint is step 4
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(corpus, "broken"), RT)
    monkeypatch.undo()
    pretrain(config(corpus, "broken", resume=True), RT)
    a, b = final_weights("straight"), final_weights("broken")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_cleanly_keeping_the_last_checkpoint(corpus, monkeypatch):
    interrupt_at(monkeypatch, call=6, nan=True)
    with pytest.raises(NanochatError, match=r"diverged.*step_000004"):
        pretrain(config(corpus, "nan"), RT)
    from nanochat.config import run_dir

    last = latest_checkpoint(run_dir("nan"))
    assert last.name == "step_000004"
    assert read_meta(last)["final"] is False  # intact and verified


def test_a_failing_step_closes_the_logger_and_the_loader(corpus, monkeypatch):
    closed = []
    for cls, name in ((loop.MetricsLogger, "logger"), (pretrain_mod.DataLoader, "loader")):
        monkeypatch.setattr(cls, "close", lambda self, real=cls.close, name=name: (closed.append(name), real(self)))
    interrupt_at(monkeypatch, call=2, exc=RuntimeError)
    with pytest.raises(RuntimeError):
        pretrain(config(corpus, "failing"), RT)
    assert sorted(closed) == ["loader", "logger"]


def test_refusals_name_the_fix(corpus):
    with pytest.raises(NanochatError, match="--resume: run 'fresh' has no base checkpoint"):
        pretrain(config(corpus, "fresh", resume=True), RT)
    with pytest.raises(NanochatError, match="nanochat tokenizer train"):
        pretrain(config(corpus, "x", tokenizer="missing"), RT)
    with pytest.raises(ConfigError, match="--micro-batch"):
        pretrain(config(corpus, "x", micro_batch=3), RT)
    pretrain(config(corpus, "twice", max_steps=2, save_every=0), RT)
    with pytest.raises(NanochatError, match="--resume"):
        pretrain(config(corpus, "twice", max_steps=2), RT)
    with pytest.raises(NanochatError, match="model.depth: checkpoint has 2, this run has 3"):
        pretrain(config(corpus, "twice", max_steps=4, resume=True,
                        model=ModelConfig(depth=3, aspect_ratio=32, head_dim=32, sequence_len=32)), RT)


def test_compiled_pretraining_compiles_once_and_learns_as_eager(corpus):
    """The default path (compiled, with --dtype auto: bf16 autocast on a CPU with bf16 matmuls):
    one graph for every step, evaluations in between included, and the same losses as eager."""
    import torch._dynamo

    from nanochat.config import run_dir
    from nanochat.metrics import read_metrics

    def losses(run):
        return [r["loss"] for r in read_metrics(run_dir(run) / "metrics.jsonl") if "loss" in r]

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile after warm-up fails the test
        pretrain(config(corpus, "compiled", compile=True, max_steps=6, eval_every=3, save_every=0), RT)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really was compiled
    pretrain(config(corpus, "eager", max_steps=6, eval_every=3, save_every=0), RT)
    compiled, eager = losses("compiled"), losses("eager")
    assert len(compiled) == len(eager) == 6 and compiled[-1] < compiled[0]
    tolerance = 2e-2 if RT.autocast_dtype is not None else 1e-4  # bf16 rounds fused kernels differently
    assert compiled == pytest.approx(eager, rel=tolerance)


def test_two_nodes_of_two_processes_on_loopback_train_and_resume(corpus):
    """Multi-node as torchrun runs it: two launchers (`--nnodes 2`, node ranks 0 and 1) meeting at a
    c10d rendezvous on 127.0.0.1, two processes each; then the same again with --resume."""
    import socket

    from nanochat.config import run_dir

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def launch(steps: int, resume: bool) -> None:
        def node(rank: int) -> subprocess.Popen:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
                   f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                   f"--rdzv_id=nodes-{steps}", "-m", "nanochat.cli", "--", "pretrain", "--run", "nodes",
                   "--tokenizer", "t", "--data", str(corpus), "--device", "cpu", "--depth", "2",
                   "--aspect-ratio", "32", "--head-dim", "32", "--sequence-len", "32", "--total-batch-tokens", "256",
                   "--micro-batch", "2", "--max-steps", str(steps), "--save-every", "2", "--eval-every", "0",
                   "--eval-tokens", "1024", "--no-compile", *(["--resume"] if resume else [])]
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ))
        nodes = [node(0), node(1)]
        outputs = [n.communicate(timeout=300)[0] for n in nodes]
        for n, out in zip(nodes, outputs, strict=True):
            assert n.returncode == 0, out[-3000:]

    launch(2, resume=False)
    first = read_meta(latest_checkpoint(run_dir("nodes")))
    assert first["step"] == 2 and first["world_size"] == 4
    launch(4, resume=True)
    meta = read_meta(latest_checkpoint(run_dir("nodes")))
    assert meta["step"] == 4 and meta["final"] and meta["world_size"] == 4 and math.isfinite(meta["val_bpb"])
    # every rank wrote its own optimizer shard, and the resumed run continued from them
    assert sorted(p.name for p in latest_checkpoint(run_dir("nodes")).glob("rank*.pt")) == [
        f"rank{r}.pt" for r in range(4)]


def test_out_of_memory_ends_with_the_estimate_and_the_fix(corpus, monkeypatch):
    def oom(plan, rt):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pretrain_mod, "train_stage", oom)
    with pytest.raises(NanochatError, match=r"(?s)out of memory on cpu at --micro-batch 4 .*--micro-batch 2.*total"):
        pretrain(config(corpus, "oom"), RT)


def test_auto_micro_batch_is_resolved_and_recorded(corpus):
    summary = pretrain(config(corpus, "auto-mb", micro_batch="auto", max_steps=1, save_every=0), RT)
    from nanochat.config import run_dir

    meta = read_meta(latest_checkpoint(run_dir("auto-mb")))
    # 256 tokens per step of 32-token rows: at most 8 rows, and this machine's memory holds them all
    assert meta["config"]["micro_batch"] == 8 and summary["steps"] == 1


def unigram_bpb(corpus, tok):
    """Cross-entropy of the validation text under the training split's token frequencies (add-one)."""
    from nanochat.data.sources import folder_source

    src = folder_source(corpus)
    counts = Counter()
    for ids in tok.encode_batch(list(src.documents("train"))):
        counts.update(ids)
    total = sum(counts.values()) + tok.vocab_size
    bits = n_bytes = 0
    for text in src.documents("val"):
        for i in tok.encode(text):
            bits -= math.log2((counts[i] + 1) / total)
        n_bytes += len(text.encode())
    return bits / n_bytes


def test_short_pretraining_beats_the_unigram_baseline(corpus):
    summary = pretrain(config(corpus, "learn", max_steps=150, save_every=0, total_batch_tokens=4 * 32,
                              eval_tokens=4096), RT)
    baseline = unigram_bpb(corpus, Tokenizer.load(tokenizer_dir("t")))
    assert summary["val_bpb"] < 0.85 * baseline, (summary["val_bpb"], baseline)


def test_pretraining_under_torchrun_two_processes(corpus):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "nanochat.cli", "--", "pretrain", "--run", "ddp", "--tokenizer", "t", "--data", str(corpus),
           "--device", "cpu",
           "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--sequence-len", "32",
           "--total-batch-tokens", "256", "--micro-batch", "2", "--max-steps", "6", "--eval-every", "0",
           "--eval-tokens", "1024", "--no-compile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from nanochat.config import run_dir

    meta = read_meta(latest_checkpoint(run_dir("ddp")))
    assert meta["step"] == 6 and meta["final"] and meta["world_size"] == 2
    assert math.isfinite(meta["val_bpb"])
