import math

import pytest
import torch

from nanochat.metrics import MetricsLogger, progress, read_metrics


def test_metrics_jsonl_round_trip_and_append(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLogger(path) as log:
        log.log(1, stage="pretrain", loss=torch.tensor(2.5), lr=0.01)
        log.log(2, stage="pretrain", loss=math.nan)
    with MetricsLogger(path) as log:  # a resumed run appends
        log.log(3, loss=1.0)
    records = list(read_metrics(path))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 2.5 and records[0]["stage"] == "pretrain"
    assert records[1]["loss"] is None  # NaN stays valid JSON


def test_torn_last_line_is_skipped_but_corruption_elsewhere_is_not(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1]
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        list(read_metrics(path))


def test_progress_is_quiet_off_a_terminal(capsys):
    assert sum(progress(range(5), desc="x")) == 10
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a TTY
