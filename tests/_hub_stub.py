"""A stand-in for the Hugging Face hub: hf_hub_download writes a parquet fixture instead of fetching."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.tasks import hub


def stub_hub(monkeypatch, home: Path, fixtures: dict) -> list:
    """NANOCHAT_HOME in `home`; downloads of (repo_id, filename) write fixtures[(repo_id, filename)]
    = (schema, rows). Returns the list of downloads made, in order."""
    monkeypatch.setenv("NANOCHAT_HOME", str(home))
    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir, **kwargs):
        assert repo_type == "dataset"
        calls.append((repo_id, filename))
        schema, rows = fixtures[(repo_id, filename)]
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    return calls
