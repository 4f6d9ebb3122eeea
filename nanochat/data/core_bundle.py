"""The CORE eval bundle: its format on disk, read and validated, and its download.

A bundle (the DCLM / nanochat eval_bundle) is a folder with `core.yaml` (the tasks: label,
dataset_uri, icl_task_type, num_fewshot, continuation_delimiter), `eval_meta_data.csv` (each
task's random baseline, in percent, by 'Eval Task') and `eval_data/<dataset_uri>` (one JSON object
per line). Three task types, whose rows have these fields:

    multiple_choice   {"query", "choices", "gold"}          the choices differ in continuation
    schema            {"context_options", "continuation", "gold"}   the options differ in context
    language_modeling {"context", "continuation"}           right iff greedy decoding reproduces it

`load_bundle` turns a bundle into `CoreTask`s, checking every file and row first, so that a bad
bundle fails at once with the file and line, not an hour into an evaluation.
`download_core_bundle` fetches the bundle's zip over HTTPS and puts it in place only once it
loads. Rendering the items into prompts and scoring a model on them is evaluate/core.py's job.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub.file_download import http_get

from nanochat.config import CORE_BUNDLE_URL
from nanochat.data.sources import DataError
from nanochat.errors import NanochatError

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
BUNDLE_HINT = ("an eval bundle is a folder with core.yaml, eval_meta_data.csv and eval_data/ "
               "(the DCLM / nanochat eval_bundle); download and unpack it, then pass that folder")


@dataclass(frozen=True)
class CoreTask:
    """One task of the bundle, with its rows as read from its eval_data file."""

    label: str
    kind: str  # one of TASK_TYPES
    num_fewshot: int
    delimiter: str  # between context and continuation
    baseline: float  # accuracy of random guessing, as a fraction
    items: list[dict]


# ---------------------------------------------------------------------------------------------
# Reading and validating


def load_bundle(bundle_dir: str | Path) -> list[CoreTask]:
    """The tasks of an eval bundle, validated, so that a bad file fails here and not an hour in."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise NanochatError(f"CORE eval bundle {root} is not a folder; {BUNDLE_HINT}")
    specs = _read_task_specs(root / "core.yaml")
    baselines = _read_baselines(root / "eval_meta_data.csv")
    tasks = []
    for spec in specs:
        label = spec["label"]
        if label not in baselines:
            raise NanochatError(f"task '{label}' of {root / 'core.yaml'} has no row in "
                                f"{root / 'eval_meta_data.csv'} (its 'Eval Task' column); add its random baseline")
        items = _read_items(root / "eval_data" / spec["dataset_uri"], spec["kind"])
        tasks.append(CoreTask(label, spec["kind"], spec["num_fewshot"], spec["delimiter"], baselines[label], items))
    return tasks


def _read_task_specs(path: Path) -> list[dict]:
    if not path.is_file():
        raise NanochatError(f"{path} is missing; {BUNDLE_HINT}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NanochatError(f"{path} is not valid YAML ({e}); restore it from the eval bundle") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else config
    if not isinstance(entries, list) or not entries:
        raise NanochatError(f"{path} lists no tasks: expected 'icl_tasks:' with a list of tasks")
    specs = []
    for n, entry in enumerate(entries, 1):
        where = f"{path}, task {n}"
        if not isinstance(entry, dict):
            raise NanochatError(f"{where} is not a mapping of label, dataset_uri, num_fewshot, icl_task_type")
        missing = [k for k in ("label", "dataset_uri", "icl_task_type") if k not in entry]
        if missing:
            raise NanochatError(f"{where} lacks {', '.join(missing)}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise NanochatError(f"{where} ('{entry['label']}') has icl_task_type {entry['icl_task_type']!r}; "
                                f"expected one of {', '.join(TASK_TYPES)}")
        shots = entry.get("num_fewshot", 0)
        if isinstance(shots, list):  # DCLM writes e.g. [10]: one run per count; CORE uses one
            shots = shots[0] if len(shots) == 1 else None
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise NanochatError(f"{where} ('{entry['label']}') has num_fewshot {entry.get('num_fewshot')!r}; "
                                "expected one non-negative integer")
        specs.append({"label": str(entry["label"]), "dataset_uri": str(entry["dataset_uri"]),
                      "kind": entry["icl_task_type"], "num_fewshot": shots,
                      "delimiter": str(entry.get("continuation_delimiter", " "))})
    return specs


def _read_baselines(path: Path) -> dict[str, float]:
    """Task label -> random baseline as a fraction (the CSV has it in percent)."""
    if not path.is_file():
        raise NanochatError(f"{path} is missing; {BUNDLE_HINT}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise NanochatError(f"{path} is not a readable CSV ({e}); restore it from the eval bundle") from None
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise NanochatError(f"{path} needs the columns 'Eval Task' and 'Random baseline'")
    baselines = {}
    for n, row in enumerate(rows, 2):
        try:
            baseline = float(row["Random baseline"]) / 100
        except (TypeError, ValueError):
            raise NanochatError(f"{path}:{n}: random baseline {row['Random baseline']!r} is not a number") from None
        if not 0 <= baseline < 1:
            raise NanochatError(f"{path}:{n}: random baseline {row['Random baseline']} must be in [0, 100)")
        baselines[row["Eval Task"]] = baseline
    return baselines


def _read_items(path: Path, kind: str) -> list[dict]:
    if not path.is_file():
        raise NanochatError(f"{path} is missing; {BUNDLE_HINT}")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanochatError(f"{path}:{n}: not a JSON object ({e}); "
                                   "restore the file from the eval bundle") from None
            problem = _item_problem(item, kind)
            if problem:
                raise NanochatError(f"{path}:{n}: {problem} (a {kind} row)")
            items.append(item)
    if not items:
        raise NanochatError(f"{path} has no examples; restore it from the eval bundle")
    return items


def _item_problem(item, kind: str) -> str | None:
    """What is wrong with one row, or None."""
    if not isinstance(item, dict):
        return "expected a JSON object"
    fields = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
              "language_modeling": ("context", "continuation")}[kind]
    missing = [k for k in fields if k not in item]
    if missing:
        return f"missing {', '.join(missing)}"
    if kind == "language_modeling":
        return None
    options = item["choices" if kind == "multiple_choice" else "context_options"]
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        return "the options must be a non-empty list of strings"
    gold = item["gold"]
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
        return f"gold {gold!r} is not an index into its {len(options)} options"
    return None


# ---------------------------------------------------------------------------------------------
# The download: one zip (core.yaml, eval_meta_data.csv, eval_data/) served over plain HTTPS


def download_core_bundle(dest: Path, url: str = CORE_BUNDLE_URL, force: bool = False) -> Path:
    """Download the eval bundle zip and unpack it into `dest`, which is replaced only once the new
    bundle has been unpacked and validated: a failed or corrupt download never costs the old one.
    The zip is kept as `<dest>.zip.part` while incomplete, so running again resumes it."""
    if (dest / "core.yaml").is_file() and not force:
        load_bundle(dest)  # present: only check it (a damaged one says how to fix it)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".zip.part")
    try:
        with open(part, "ab") as f:
            http_get(url, f, resume_size=f.tell(), displayed_filename=url.rsplit("/", 1)[-1])
    except Exception as e:
        raise DataError(f"could not download the CORE eval bundle from {url}: {e}; run the same command "
                        "again to resume, or pass --url") from e
    unpacked = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        with zipfile.ZipFile(part) as z:
            for name in z.namelist():  # a hostile archive must not write outside its folder
                target = (unpacked / name).resolve()
                if not target.is_relative_to(unpacked.resolve()):
                    raise DataError(f"the CORE bundle from {url} holds a path outside the bundle: {name!r}")
            z.extractall(unpacked)
    except zipfile.BadZipFile:
        part.unlink()
        raise DataError(f"the download from {url} is not a zip file; it was deleted, run again to retry") from None
    roots = sorted(p.parent for p in unpacked.rglob("core.yaml"))
    if not roots:
        shutil.rmtree(unpacked)
        raise DataError(f"the zip from {url} holds no core.yaml; is it the DCLM / nanochat eval bundle?")
    load_bundle(roots[0])  # refuse a bundle CORE could not read, before it replaces anything
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    roots[0].rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(unpacked, ignore_errors=True)
    part.unlink()
    return dest
