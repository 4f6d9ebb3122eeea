"""`nanochat data {download,core-bundle,offline,stats}`: FineWeb-Edu shards (data/download.py), the
CORE eval bundle (data/core_bundle.py), the offline corpus (data/offline.py) and a source's sizes
(data/sources.py)."""

from __future__ import annotations

from nanochat.config import CoreBundleConfig, DataDownloadConfig, DataStatsConfig, home, parse_config
from nanochat.data.core_bundle import download_core_bundle
from nanochat.data.download import download_shards
from nanochat.data.offline import build_offline_corpus
from nanochat.data.sources import resolve_source
from nanochat.errors import NanochatError

USAGE = """usage: nanochat data <action> [options]

actions:
  download     fetch the first N parquet shards of FineWeb-Edu (or another hub dataset)
  core-bundle  fetch and unpack the CORE eval bundle into NANOCHAT_HOME/data/eval_bundle
  offline      write the offline Wikipedia corpus into NANOCHAT_HOME/data/offline-wiki
  stats        documents and characters per split of a data source"""


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    action, rest = argv[0], argv[1:]
    prog = f"nanochat data {action}"
    if action == "download":
        cfg = parse_config(DataDownloadConfig, rest, prog=prog, description=DataDownloadConfig.__doc__)
        dest = home() / "data" / cfg.name
        paths = download_shards(cfg.num_shards, dest, cfg.repo_id, cfg.pattern, cfg.text_field, cfg.workers)
        print(f"{len(paths)} shards in {dest} (validation: {paths[-1].name})")
    elif action == "core-bundle":
        cfg = parse_config(CoreBundleConfig, rest, prog=prog, description=CoreBundleConfig.__doc__)
        print(download_core_bundle(home() / "data" / "eval_bundle", cfg.url, cfg.force))
    elif action == "offline":
        parse_config(_NoOptions, rest, prog=prog, description="Write the offline Wikipedia corpus.")
        print(build_offline_corpus())
    elif action == "stats":
        cfg = parse_config(DataStatsConfig, rest, prog=prog, description=DataStatsConfig.__doc__)
        source = resolve_source(cfg.data, cfg.text_field)
        print(f"{'split':<6} {'files':>6} {'documents':>10} {'characters':>14}")
        for split in ("train", "val"):
            docs = chars = 0
            for doc in source.documents(split):
                docs += 1
                chars += len(doc)
            print(f"{split:<6} {len(source.files(split)):>6} {docs:>10,} {chars:>14,}")
    else:
        raise NanochatError(f"unknown action {action!r}\n\n{USAGE}")
    return 0


class _NoOptions:
    pass
