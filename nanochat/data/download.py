"""Download parquet shards from the Hugging Face hub (FineWeb-Edu by default).

`huggingface_hub` does the transfer (resuming partial files, checking LFS checksums); this module
picks the shards, downloads several at once, checks that each is a readable parquet file with the
text column, and retries a damaged one once. Shards already present and valid are skipped, so an
interrupted download is resumed by running the same command again. (The CORE eval bundle, a
zip over plain HTTPS, has its own download beside its format, in data/core_bundle.py.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import disable_progress_bars

from nanochat.data.sources import DataError
from nanochat.metrics import progress

FINEWEB_REPO = "karpathy/fineweb-edu-100b-shuffle"
FINEWEB_PATTERN = "shard_{index:05d}.parquet"


def shard_ok(path: Path, text_field: str) -> bool:
    """A complete shard: its parquet footer parses, it has rows and the text column."""
    try:
        pf = pq.ParquetFile(path)
        return pf.metadata.num_rows > 0 and text_field in pf.schema_arrow.names
    except Exception:
        return False


def _fetch(repo_id: str, filename: str, dest: Path, text_field: str, repo_type: str) -> Path:
    target = dest / filename
    for attempt in range(2):
        if target.exists() and shard_ok(target, text_field):
            return target
        target.unlink(missing_ok=True)  # damaged: fetch it whole again
        try:
            hf_hub_download(repo_id=repo_id, filename=filename, repo_type=repo_type, local_dir=dest)
        except Exception as e:
            if attempt == 1:
                raise DataError(f"could not download {filename} from {repo_id}: {e}") from e
    if not shard_ok(target, text_field):
        raise DataError(f"{target} is damaged even after a second download (no readable parquet with "
                        f"column {text_field!r}); check --repo-id / --pattern / --text-field")
    return target


def download_shards(
    n: int,
    dest: Path,
    repo_id: str = FINEWEB_REPO,
    pattern: str = FINEWEB_PATTERN,
    text_field: str = "text",
    workers: int = 8,
    repo_type: str = "dataset",
) -> list[Path]:
    """Fetch shards 0 … n-1 into `dest`; the last of them serves as the validation split."""
    if n < 2:
        raise DataError("download at least 2 shards: the last one is the validation split")
    dest.mkdir(parents=True, exist_ok=True)
    disable_progress_bars()  # one bar over shards instead of one per file
    names = [pattern.format(index=i) for i in range(n)]
    paths: dict[str, Path] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_fetch, repo_id, name, dest, text_field, repo_type): name for name in names}
        for future in progress(as_completed(futures), total=len(futures), desc="shards", unit="shard"):
            paths[futures[future]] = future.result()
    return [paths[name] for name in names]
