"""Checkpoints: one directory per step, written atomically, verified on load.

    <run>/checkpoints/step_000500/
        model.safetensors   weights
        rank0.pt …          per-rank optimizer state and RNG states
        meta.json           config, step, tokenizer identity, resume state, and a manifest
                            (size and SHA-256 of every other file)

A save writes everything into `step_000500.tmp`, fsyncs it, and renames it into place; only a
directory whose meta.json exists under the final name counts as a checkpoint. A crash mid-save
therefore leaves the previous checkpoint as the latest, and a damaged file is caught by the
manifest before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from nanochat.errors import NanochatError

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(NanochatError):
    """A checkpoint is missing, damaged, or does not fit what is being loaded; the message says which."""


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and half-written ones are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state) -> tuple:
    kind, key, pos, has_gauss, gauss = state
    return (kind, key.tolist(), int(pos), int(has_gauss), float(gauss))


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------
# Saving


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    meta: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    keep_last: int | None = None,
    rank_state: dict | None = None,
) -> Path:
    """Save a checkpoint for `step`; every rank calls this (collectively, under torchrun).

    `meta` holds what the caller needs to resume or rebuild: `config`, `tokenizer`, `resume`
    — anything JSON-serialisable. Rank 0 writes the weights and meta.json; each rank writes its own
    optimizer and RNG state plus `rank_state` (tensors welcome: e.g. the data loader's position and
    buffer). With `keep_last`, older checkpoints beyond that many are deleted after the new one is
    in place.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
        tmp.mkdir()
    _barrier()

    per_rank = {"optimizer": optimizer.state_dict() if optimizer is not None else None, "rng": rng_state(),
                "extra": rank_state}
    torch.save(per_rank, tmp / _rank_file(rank))
    _fsync_path(tmp / _rank_file(rank))
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        _fsync_path(tmp / "model.safetensors")
    _barrier()

    if rank == 0:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        record = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(meta or {}),
            "files": files,
        }
        _fsync_write(tmp / "meta.json", json.dumps(record, indent=2).encode())
        _fsync_path(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# --------------------------------------------------------------------------------------------
# Loading


def read_meta(path: str | os.PathLike, verify: bool = True) -> dict:
    """meta.json of a checkpoint directory, after checking every file against its manifest."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json); "
                              "it may be an interrupted save — use an earlier checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r} is not the "
                              f"supported format {FORMAT_VERSION}")
    for name, expect in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from the checkpoint")
        size = f.stat().st_size
        if size != expect["bytes"]:
            raise CheckpointError(f"{f} is truncated or damaged: {size} bytes, expected {expect['bytes']}")
        if verify and _sha256(f) != expect["sha256"]:
            raise CheckpointError(f"{f} is damaged: its SHA-256 does not match the checkpoint manifest")
    return meta


def _config_diff(saved, expected, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(saved) | set(expected)):
            out += _config_diff(saved.get(key), expected.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == expected else [f"{prefix[:-1]}: checkpoint has {saved!r}, this run has {expected!r}"]


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    expected_config: dict | None = None,
    restore_rng: bool = False,
    verify: bool = True,
) -> dict:
    """Load a checkpoint into `model` (and `optimizer`, RNG) and return its meta, with this
    rank's `rank_state` under the key "rank_state" when optimizer or RNG state was asked for.

    With `expected_config`, the saved `meta["config"]` must hold the same values for every key
    given, or the load is refused before anything is touched.
    """
    path = Path(path)
    meta = read_meta(path, verify=verify)
    if expected_config is not None:
        diff = _config_diff({k: meta.get("config", {}).get(k) for k in expected_config}, expected_config)
        if diff:
            raise CheckpointError(f"{path} was saved with a different configuration:\n  " + "\n  ".join(diff))
    if model is not None:
        try:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"{path / 'model.safetensors'} cannot be read: {e}") from e
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit this model: missing {sorted(missing)}, "
                                  f"unexpected {sorted(unexpected)}")
    if optimizer is not None or restore_rng:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if optimizer is not None and meta["world_size"] != world_size:
            raise CheckpointError(f"{path} was saved by {meta['world_size']} ranks; resuming its optimizer "
                                  f"state needs the same number of ranks (got {world_size})")
        rank_path = path / _rank_file(rank)
        if not rank_path.is_file():
            raise CheckpointError(f"{rank_path} is missing (checkpoint has {meta['world_size']} ranks)")
        state = torch.load(rank_path, map_location="cpu", weights_only=True)
        if optimizer is not None:
            if state["optimizer"] is None:
                raise CheckpointError(f"{path} holds no optimizer state")
            optimizer.load_state_dict(state["optimizer"])
        if restore_rng:
            set_rng_state(state["rng"])
        meta["rank_state"] = state.get("extra")
    return meta
