import pytest
import torch
import torch.nn.functional as F

from nanochat.config import PRESETS
from nanochat.errors import NanochatError
from nanochat.verify_model import cli, sparkline


@pytest.fixture(autouse=True)
def one_thread():
    """A hundred steps of a tiny model: on shared CI cores, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("options", [
    [], ["--mlp", "relu2"], ["--n-kv-head", "1"], ["--no-qk-norm"], ["--logit-softcap", "0"], ["--tie-embeddings"],
    ["--value-embeddings", "--x0-skip"],
], ids=["default", "relu2", "gqa", "no-qk-norm", "no-softcap", "tied", "value-embeddings+x0"])
def test_verify_model_passes_on_cpu(options, capsys):
    assert cli(["--device", "cpu", *options]) == 0
    out = capsys.readouterr().out
    assert "step   90" in out and "loss curve" in out and "ok: loss" in out


@pytest.mark.slow
def test_verify_model_passes_for_the_tiny_preset_shape(capsys):
    m = PRESETS["tiny"].model
    flags = ["--depth", m.depth, "--aspect-ratio", m.aspect_ratio, "--head-dim", m.head_dim, "--sequence-len",
             m.sequence_len]
    assert cli(["--device", "cpu", *map(str, flags)]) == 0


def test_too_few_steps_fail_with_a_hint():
    with pytest.raises(NanochatError, match="rotary embedding"):
        cli(["--device", "cpu", "--steps", "3"])


def test_a_leaky_attention_mask_is_caught(monkeypatch):
    sdpa = F.scaled_dot_product_attention

    def bidirectional(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        return sdpa(q, k, v, scale=scale, enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", bidirectional)
    with pytest.raises(NanochatError, match="not causal"):
        cli(["--device", "cpu"])


def test_sparkline_is_log_scaled_and_resampled():
    assert sparkline([1.0, 0.1, 0.01]) == "█▅▁"
    assert len(sparkline([1.0 / (i + 1) for i in range(200)], width=50)) == 50
    assert sparkline([2.0, float("nan")]) == "▁?"  # a diverged run still draws
