"""Run metrics (`metrics.jsonl`, optionally wandb) and the one progress-bar helper every stage uses."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from nanochat.runtime import is_master

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, total: float | None = None, desc: str | None = None,
             **kwargs) -> tqdm:
    """A tqdm bar shown on rank 0 only, and only on a terminal (quiet in logs and CI)."""
    return tqdm(iterable, total=total, desc=desc, disable=None if is_master() else True,
                dynamic_ncols=True, **kwargs)


def write0(text: str) -> None:
    """Print a line on rank 0 without tearing an open progress bar."""
    if is_master():
        tqdm.write(text)


def _jsonable(value):
    """Plain JSON for a metric value: tensors and numpy scalars become numbers, NaN/inf become None
    (JSON has no NaN, and a NaN loss must not make the whole file unreadable)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON object per line to `<run>/metrics.jsonl` (rank 0 only) and, when the user
    asked for it with `WANDB_PROJECT` and wandb is installed, mirrors the same numbers to wandb."""

    def __init__(self, path: str | os.PathLike, config: dict | None = None, run_name: str | None = None):
        self.path = Path(path)
        self.enabled = is_master()
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # append: a resumed run continues the file
        project = os.environ.get("WANDB_PROJECT")
        if project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("WANDB_PROJECT is set but wandb is not installed (uv pip install wandb)") from e
            self._wandb = wandb.init(project=project, name=run_name, config=config)

    def log(self, step: int, stage: str | None = None, **metrics) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        if stage is not None:
            record["stage"] = stage
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time", "stage")}, step=step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._wandb is not None:
                self._wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a metrics.jsonl. A torn last line (a crash mid-write) is skipped; a corrupt
    line elsewhere is an error naming it."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                return
            raise ValueError(f"{path}:{i}: not a JSON metrics record ({e})") from None
