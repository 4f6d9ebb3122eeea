import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data import download, offline
from nanochat.data.sources import DataError, folder_source, resolve_source


def write_parquet(path, texts, column="text", row_group=3):
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group)


def test_parquet_jsonl_and_txt_sources(tmp_path):
    write_parquet(tmp_path / "a.parquet", [f"pq {i}" for i in range(7)])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"js {i}"}) for i in range(3)) + "\n")
    (tmp_path / "c.txt").write_text("the validation document")
    with pytest.raises(DataError, match="no string field 'text'"):
        list(folder_source(tmp_path).documents("train"))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"js {i}"}) for i in range(3)) + "\n")
    src = folder_source(tmp_path)
    assert list(src.documents("train")) == [f"pq {i}" for i in range(7)] + [f"js {i}" for i in range(3)]
    assert list(src.documents("val")) == ["the validation document"]


def test_ranks_read_disjoint_units_that_cover_everything(tmp_path):
    write_parquet(tmp_path / "a.parquet", [f"doc {i}" for i in range(20)], row_group=3)
    write_parquet(tmp_path / "z.parquet", ["val"])
    src = folder_source(tmp_path)
    parts = [list(src.documents("train", rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(src.documents("train"))
    assert all(set(parts[i]).isdisjoint(parts[j]) for i in range(3) for j in range(i + 1, 3))


def test_train_val_subfolders(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "x.txt").write_text(f"{split} text")
    src = folder_source(tmp_path)
    assert list(src.documents("val")) == ["val text"]


def test_corrupt_shard_is_named(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["fine"])
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not a parquet file")
    write_parquet(tmp_path / "c.parquet", ["val"])
    src = folder_source(tmp_path)
    with pytest.raises(DataError, match=r"b\.parquet is not a readable parquet file"):
        list(src.documents("train"))
    skipping = folder_source(tmp_path, skip_bad=True)
    with pytest.warns(UserWarning, match="b.parquet"):
        assert list(skipping.documents("train")) == ["fine"]


def test_invalid_utf8_missing_column_and_too_few_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ok \xff\xfe bad")
    (tmp_path / "b.txt").write_text("val")
    with pytest.raises(DataError, match=r"a\.txt: invalid UTF-8 at byte 3"):
        list(folder_source(tmp_path).documents("train"))
    other = tmp_path / "other"
    other.mkdir()
    write_parquet(other / "a.parquet", ["x"], column="content")
    write_parquet(other / "b.parquet", ["y"], column="content")
    with pytest.raises(DataError, match="no column 'text'.*--text-field"):
        list(folder_source(other).documents("train"))
    assert list(folder_source(other, text_field="content").documents("train")) == ["x"]
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "only.txt").write_text("x")
    with pytest.raises(DataError, match="at least two data files"):
        folder_source(lonely)


def test_missing_fineweb_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    with pytest.raises(DataError, match="nanochat data download"):
        resolve_source("fineweb")


def test_offline_corpus_builds_with_a_fixed_validation_split(tmp_path):
    folder = offline.build_offline_corpus(tmp_path)
    files = sorted(p.name for p in folder.glob("*.parquet"))
    assert files == [f"shard_{i:05d}.parquet" for i in range(offline.TRAIN_SHARDS + 1)]
    src = folder_source(folder)
    val = list(src.documents("val"))
    train = list(src.documents("train"))
    articles = offline.load_articles()
    assert len(train) + len(val) == len(articles) > 25_000
    assert 0.03 < len(val) / len(articles) < 0.07
    assert set(val) == {a["text"] for a in articles if offline.is_validation(a)}
    assert set(val).isdisjoint(train)
    langs = pq.read_table(folder / "shard_00000.parquet", columns=["lang"]).column("lang").to_pylist()
    assert set(langs) == {"en-us", "es-es", "fr-fr"}  # shuffled across languages
    assert offline.build_offline_corpus(tmp_path) == folder  # built once, then reused


def test_download_is_parallel_resumable_and_verified(tmp_path, monkeypatch):
    """The whole download path against a stubbed hub that serves real parquet files."""
    hub = tmp_path / "hub"
    hub.mkdir()
    for i in range(4):
        write_parquet(hub / f"shard_{i:05d}.parquet", [f"shard {i} doc {j}" for j in range(5)])
    calls = []
    damaged_once = {"shard_00002.parquet"}

    def fake_hf_hub_download(repo_id, filename, repo_type, local_dir):
        calls.append(filename)
        assert (repo_id, repo_type) == ("me/corpus", "dataset")
        data = (hub / filename).read_bytes()
        if filename in damaged_once:  # first transfer arrives truncated
            damaged_once.discard(filename)
            data = data[: len(data) // 2]
        (local_dir / filename).write_bytes(data)
        return str(local_dir / filename)

    monkeypatch.setattr(download, "hf_hub_download", fake_hf_hub_download)
    dest = tmp_path / "shards"
    paths = download.download_shards(3, dest, repo_id="me/corpus", workers=3)
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in range(3)]
    assert sorted(calls) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet",
                             "shard_00002.parquet"]  # the damaged one was fetched again
    calls.clear()
    download.download_shards(4, dest, repo_id="me/corpus")  # resumes: only the new shard
    assert calls == ["shard_00003.parquet"]
    src = folder_source(dest)
    assert list(src.documents("val")) == [f"shard 3 doc {j}" for j in range(5)]
