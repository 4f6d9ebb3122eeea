"""midtrain and sft through the shared stage loop: resume-or-refuse, resume, and a clean stop."""

import dataclasses

import pytest

from nanochat import metrics
from nanochat.checkpoint import read_meta
from nanochat.config import ChatConfig, DeviceConfig, OptimConfig
from nanochat.errors import NanochatError
from nanochat.metrics import read_metrics
from nanochat.runs import latest
from nanochat.runtime import init_runtime
from nanochat.train import loop
from nanochat.train.chat import train_chat
from tests._chat_model import make_chat_model

RT = init_runtime(device="cpu")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    make_chat_model(run="c", tokenizer="c", stage="base", sequence_len=256)
    return tmp_path


def chat_config(**overrides) -> ChatConfig:
    cfg = ChatConfig(run="c", tasks="identity", batch_size=4, micro_batch=2, max_steps=2, keep_last=3, compile=False,
                     runtime=DeviceConfig(device="cpu"), optim=OptimConfig(reference_batch_tokens=256))
    return dataclasses.replace(cfg, **overrides)


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_every_chat_stage_resumes_or_refuses_like_pretraining(home, stage):
    with pytest.raises(NanochatError, match=f"--resume: run 'c' has no {stage} checkpoint"):
        train_chat(stage, chat_config(resume=True), RT)
    first = train_chat(stage, chat_config(), RT)
    assert first["start_from"] == "base" and read_meta(latest("c", stage))["step"] == 2
    with pytest.raises(NanochatError, match=f"already has {stage} checkpoints.*pass --resume"):
        train_chat(stage, chat_config(max_steps=3), RT)
    train_chat(stage, chat_config(max_steps=3, resume=True), RT)
    meta = read_meta(latest("c", stage))
    assert (meta["step"], meta["final"], meta["stage"], meta["start_from"]) == (3, True, stage, "base")
    steps = [r["step"] for r in read_metrics(home / "runs" / "c" / "metrics.jsonl")
             if r.get("stage") == stage and "loss" in r]
    assert steps == [1, 2, 3]  # the resumed run went on from step 2, not from the start


def test_sft_starts_from_mid_when_there_is_one(home):
    train_chat("mid", chat_config(), RT)
    assert train_chat("sft", chat_config(), RT)["start_from"] == "mid"


class RecordingLogger(metrics.MetricsLogger):
    made: list["RecordingLogger"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed = False
        RecordingLogger.made.append(self)

    def close(self):
        self.closed = True
        super().close()


def test_a_failing_step_closes_the_logger(home, monkeypatch):
    RecordingLogger.made.clear()
    monkeypatch.setattr(loop, "MetricsLogger", RecordingLogger)
    calls = {"n": 0}
    real = loop.train_step

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", fail_second)
    with pytest.raises(RuntimeError, match="device lost"):
        train_chat("mid", chat_config(), RT)
    assert [logger.closed for logger in RecordingLogger.made] == [True]
    assert latest("c", "mid") is None  # nothing half-written


def test_compiled_sft_compiles_once_for_rows_of_every_width(home, monkeypatch):
    import torch._dynamo

    from nanochat.data.chat import ChatBatches

    widths = []
    real_next = ChatBatches.__next__

    def recording_next(self):
        x, y = real_next(self)
        widths.append(x.shape[1])
        return x, y

    monkeypatch.setattr(ChatBatches, "__next__", recording_next)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails the test
        summary = train_chat("sft", chat_config(compile=True, max_steps=6), RT)
    assert summary["steps"] == 6 and len(set(widths[:12])) > 2  # the rows really did change width
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # and the step really was compiled
