"""The online tasks' data: parquet files downloaded once from the Hugging Face hub.

Files go to NANOCHAT_HOME/data/tasks/<folder>/<path in the repo> (the folder is the task's name,
or one shared by sibling tasks: arc for arc_easy and arc_challenge) and are read from there ever
after, so only the first use needs the internet. A file that is missing or unreadable is fetched
(again); when that fails the error says which file, where it should be, and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import hf_hub_download

from nanochat.config import home
from nanochat.tasks.base import OFFLINE_TASKS, TaskError


def task_dir(name: str) -> Path:
    return home() / "data" / "tasks" / name


def _readable(path: Path) -> bool:
    try:
        return pq.ParquetFile(path).metadata is not None
    except Exception:
        return False


def fetch(name: str, repo_id: str, filenames: Sequence[str], folder: str | None = None) -> list[Path]:
    """Local paths of `filenames` of the dataset repo `repo_id`, downloading those not cached, for
    the task `name` (which errors name) into task_dir(folder or name)."""
    dest = task_dir(folder or name)
    paths = []
    for filename in filenames:
        target = dest / filename
        if not _readable(target):
            try:
                target = Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset",
                                              local_dir=dest, force_download=target.exists()))
            except Exception as e:
                raise TaskError(
                    f"the {name!r} task needs {filename} of the dataset {repo_id}, which is not in {dest} and "
                    f"could not be downloaded ({type(e).__name__}: {e}). Connect to the internet once (the "
                    f"file is kept for later runs), or leave {name!r} out of the task mixture or the chat "
                    f"evaluation (the offline tasks are {', '.join(OFFLINE_TASKS)}).") from None
            if not _readable(target):
                raise TaskError(f"{target} is not a readable parquet file: delete it and run again to download "
                                f"it afresh")
        paths.append(target)
    return paths


def read_parquet(paths: Sequence[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of all `paths`, one table, in file order."""
    try:
        columns = None if columns is None else list(columns)  # pyarrow takes a list, not a tuple
        return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)
    except (pa.ArrowException, KeyError) as e:
        raise TaskError(f"cannot read columns {list(columns or [])} from {[str(p) for p in paths]} ({e}); "
                        f"the files may be from another version of the dataset: delete them and run again") from None
