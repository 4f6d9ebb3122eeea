import json
import random

import numpy as np
import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    return model


def train_steps(model, opt, n):
    for _ in range(n):
        x = torch.randint(0, 50, (4, 8))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_round_trip_is_bitwise_and_resumes_identically(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3)
    meta = {"config": {"depth": 4}, "tokenizer": {"name": "tiny"}, "resume": {"loader": [1, 2]}}
    path = save_checkpoint(tmp_path, 3, model, meta, optimizer=opt)

    # The uninterrupted run continues: RNG draws and 2 more steps.
    after_save = (random.random(), np.random.rand(), torch.rand(3))
    train_steps(model, opt, 2)

    restored = make_model(seed=1)
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    loaded_meta = load_checkpoint(path, restored, opt2, restore_rng=True)
    assert loaded_meta["step"] == 3 and loaded_meta["resume"] == {"loader": [1, 2]}
    assert loaded_meta["tokenizer"] == {"name": "tiny"}
    assert (random.random(), np.random.rand()) == after_save[:2]
    assert torch.equal(torch.rand(3), after_save[2])
    train_steps(restored, opt2, 2)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_latest_and_keep_last(tmp_path):
    model = make_model()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    assert latest_checkpoint(tmp_path).name == "step_000040"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = make_model()
    save_checkpoint(tmp_path, 1, model, {"config": {"depth": 4}})

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_fsync_write", crash)  # dies after the weights, before meta.json
    with torch.no_grad():
        model[1].weight.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, model, {"config": {"depth": 4}})
    monkeypatch.undo()

    assert (tmp_path / "checkpoints" / "step_000002.tmp").exists()  # the debris is there...
    assert latest_checkpoint(tmp_path).name == "step_000001"  # ...but is never taken for a checkpoint
    fresh = make_model(seed=5)
    load_checkpoint(latest_checkpoint(tmp_path), fresh)
    assert torch.equal(fresh[1].weight, make_model()[1].weight)
    # and the next save cleans it up
    save_checkpoint(tmp_path, 2, model)
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()


def test_truncated_weights_are_refused_clearly(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_model())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_checkpoint(path, make_model())


def test_bit_flip_is_caught_by_the_manifest(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_model())
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path, make_model())


def test_corrupt_meta_and_missing_meta(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_model())
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        load_checkpoint(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path)


def test_config_mismatch_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_model(), {"config": {"model": {"depth": 4, "mlp": "swiglu"}}})
    load_checkpoint(path, expected_config={"model": {"depth": 4, "mlp": "swiglu"}})
    with pytest.raises(CheckpointError, match=r"model.depth: checkpoint has 4, this run has 6"):
        load_checkpoint(path, expected_config={"model": {"depth": 6, "mlp": "swiglu"}})


def test_wrong_model_shape_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_model())
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError):
        load_checkpoint(path, other)


def test_tied_weights_save_and_load(tmp_path):
    model = make_model()
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = model[0].weight  # shared storage, as with tied embeddings
    model.append(head)
    path = save_checkpoint(tmp_path, 1, model)
    fresh = make_model(seed=3)
    fresh_head = torch.nn.Linear(16, 50, bias=False)
    fresh_head.weight = fresh[0].weight
    fresh.append(fresh_head)
    load_checkpoint(path, fresh)
    assert torch.equal(fresh[3].weight, model[0].weight)
    assert json.loads((path / "meta.json").read_text())["files"]["model.safetensors"]["bytes"] > 0
