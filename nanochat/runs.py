"""Runs and their stages: the one place that knows how a run is laid out on disk, and how to load
its model back.

    NANOCHAT_HOME/runs/<run>/
        checkpoints/step_NNNNNN/        base   (nanochat pretrain)
        mid/checkpoints/step_NNNNNN/    mid    (nanochat midtrain, from base)
        sft/checkpoints/step_NNNNNN/    sft    (nanochat sft, from mid, else base)
        rl/checkpoints/step_NNNNNN/     rl     (nanochat rl, from sft)
        metrics.jsonl  eval/<stage>.json  tokenizer.json  speedrun.json  report.md

Each stage has one name ("base", "mid", "sft", "rl"), used alike in metrics.jsonl, meta.json, the
eval files, `--stage` and the report; `STAGES` lists them in pipeline order. Records written
before the stages had one name call base "pretrain"; `stage_name` reads them.

Why not inside checkpoint.py: a checkpoint is a format (atomic, verified save and load of any
module's weights and state), with no idea of runs, tokenizers or the GPT; this module is the
layer above it that does. Inference (engine, chat, serve, eval) loads models from here, never
from the training package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from nanochat.config import ModelConfig, run_dir, tokenizer_dir
from nanochat.errors import NanochatError
from nanochat.gpt import GPT
from nanochat.runtime import Runtime
from nanochat.tokenizer import Tokenizer


@dataclass(frozen=True)
class Stage:
    name: str
    """The stage's one name: metrics, meta.json, eval/<name>.json, `--stage`."""
    command: str
    """The `nanochat` command that trains it."""
    subdir: str
    """Its folder inside the run ("" for base: the run folder itself)."""
    starts_from: tuple[str, ...]
    """The stages whose model it continues, in order of preference."""


STAGES: tuple[Stage, ...] = (
    Stage("base", "pretrain", "", ()),
    Stage("mid", "midtrain", "mid", ("base",)),
    Stage("sft", "sft", "sft", ("mid", "base")),
    Stage("rl", "rl", "rl", ("sft",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}
_OLD_NAMES = {"pretrain": "base"}  # what records written before one name per stage say


def stage_name(name: str | None) -> str | None:
    """The stage's one name, also for a record that uses an older one."""
    return _OLD_NAMES.get(name, name) if name is not None else None


def get_stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise NanochatError(f"unknown stage {name!r}; the stages are {', '.join(STAGE_NAMES)}") from None


def stage_dir(run: str, stage: str) -> Path:
    """Where a stage of a run keeps its checkpoints."""
    sub = get_stage(stage).subdir
    return run_dir(run) / sub if sub else run_dir(run)


def latest(run: str, stage: str) -> Path | None:
    """The stage's newest complete checkpoint, or None."""
    return latest_checkpoint(stage_dir(run, stage))


def is_finished(run: str, stage: str) -> bool:
    """Whether the stage ran to its last step (its newest checkpoint is the final one)."""
    path = latest(run, stage)
    return path is not None and bool(read_meta(path, verify=False).get("final"))


def most_finished(run: str, stages: tuple[str, ...] = STAGE_NAMES) -> tuple[str, Path] | None:
    """(stage, newest checkpoint) of the latest of `stages` in pipeline order that the run has."""
    for stage in reversed([s for s in STAGE_NAMES if s in stages]):
        path = latest(run, stage)
        if path is not None:
            return stage, path
    return None


def missing_stage_error(run: str, stage: str) -> NanochatError:
    return NanochatError(f"run '{run}' has no {stage} checkpoint in {stage_dir(run, stage)}; make it with "
                         f"`nanochat {get_stage(stage).command} --run {run}`")


# --------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(name: str) -> Tokenizer:
    directory = tokenizer_dir(name)
    if not directory.is_dir():
        hint = "--preset tiny" if name == "tiny" else f"--name {name}"
        raise NanochatError(f"no tokenizer '{name}' in {directory}; train it first with "
                            f"`nanochat tokenizer train {hint}`")
    return Tokenizer.load(directory)


def tokenizer_identity(name: str, tok: Tokenizer) -> dict:
    """What a checkpoint records of its tokenizer: name, size and a hash of its files."""
    h = hashlib.sha256()
    for f in sorted(tokenizer_dir(name).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return {"name": name, "vocab_size": tok.vocab_size, "sha256": h.hexdigest()}


# --------------------------------------------------------------------------------------------
# Models


def build_model(meta: dict, rt: Runtime | None = None) -> GPT:
    """The (untrained) GPT a checkpoint's meta.json describes: its config's model shape and its
    tokenizer's vocabulary; on the meta device when no runtime is given (for counting)."""
    device = rt.device if rt is not None else torch.device("meta")
    with device:
        return GPT(ModelConfig.from_saved(meta["config"]["model"]), meta["tokenizer"]["vocab_size"])


def checkpoint_tokenizer(path: str | Path, meta: dict | None = None) -> Tokenizer:
    """The tokenizer the model in checkpoint directory `path` was trained with, checked to be unchanged."""
    meta = read_meta(Path(path)) if meta is None else meta
    name = meta["tokenizer"]["name"]
    tok = load_tokenizer(name)
    if tokenizer_identity(name, tok)["sha256"] != meta["tokenizer"]["sha256"]:
        raise NanochatError(f"tokenizer '{name}' changed since {path} was trained; "
                            "retrain the model or restore that tokenizer")
    return tok


def load_model(path: str | Path, rt: Runtime) -> tuple[GPT, Tokenizer, dict]:
    """The model saved in checkpoint directory `path`, verified, with the tokenizer it was trained with."""
    path = Path(path)
    meta = read_meta(path)
    tok = checkpoint_tokenizer(path, meta)
    model = build_model(meta, rt)
    load_checkpoint(path, model, verify=False)
    return model, tok, meta


def load_stage_model(run: str, stage: str, rt: Runtime) -> tuple[GPT, Tokenizer, dict]:
    """The newest model of one stage of a run, with its tokenizer and meta."""
    path = latest(run, stage)
    if path is None:
        raise missing_stage_error(run, stage)
    return load_model(path, rt)


def display_name(name: str, meta: dict) -> str:
    """How a loaded model is shown (`run/stage@step`), from find_model's name and the checkpoint's meta."""
    return f"{name}@{meta.get('step', 0)}"


def find_model(run: str, stage: str = "auto", checkpoint: str = "") -> tuple[Path, str]:
    """The checkpoint a user means, and its display name (`run/stage`, or the folder's name):
    `checkpoint` when given, else the run's `stage`, or with "auto" its most finished one."""
    if checkpoint:
        path = Path(checkpoint)
        if not (path / "meta.json").is_file():
            raise NanochatError(f"{path} is not a checkpoint directory (no meta.json); pass a "
                                "runs/<run>/…/checkpoints/step_NNNNNN folder")
        return path, path.name
    stages = STAGE_NAMES if stage == "auto" else (stage,)
    found = most_finished(run, stages)
    if found is None:
        names = " / ".join(reversed(stages))
        raise NanochatError(f"run '{run}' has no {names} model under {run_dir(run)}; train one with "
                            "`nanochat speedrun` or pick another with --run / --checkpoint")
    stage, path = found
    return path, f"{run}/{stage}"
