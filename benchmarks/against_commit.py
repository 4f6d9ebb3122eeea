"""Today's code against an earlier commit, back to back on this machine: the tiny preset's
pretraining command, or the whole CPU speedrun, timed from outside the process.

    uv run python benchmarks/against_commit.py --rev e397cb7 --what pretrain --old-args=--compile
    uv run python benchmarks/against_commit.py --rev e397cb7 --what speedrun
    uv run python benchmarks/against_commit.py --rev HEAD~3 --what pretrain --repeats 2

The earlier commit is checked out into a temporary git worktree and run with this checkout's
virtual environment and Rust extension (`nanochat/_bpe.abi3.so`, copied in; the compared code is
the Python). Each side runs in a fresh NANOCHAT_HOME and a fresh inductor cache, so nothing one
side compiled or downloaded helps the other; with --repeats the sides alternate (old, new, old, …)
so a slow hour of the shared machine hits both alike, and the table quotes medians.

`pretrain`: each side first writes the offline corpus and trains the tiny tokenizer (not timed),
then `nanochat pretrain --preset tiny` (plus --old-args / --new-args) is timed; the final
validation bpb comes from the run's metrics. `speedrun`: `nanochat speedrun` is timed, and the
table adds each stage's seconds from the run's speedrun.json.

Prints one markdown table (one row per side, the new/old ratio last). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = "nanochat/_bpe.abi3.so"


def checkout(rev: str, where: Path) -> Path:
    """A detached worktree of `rev` with today's built extension in it."""
    tree = where / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True, text=True)
    shutil.copy2(ROOT / EXTENSION, tree / EXTENSION)
    return tree


def nanochat(tree: Path, home: Path, args: list[str], log: Path) -> float:
    """Run `nanochat <args>` from `tree` with its own home and inductor cache; seconds of wall-clock."""
    env = {**os.environ, "NANOCHAT_HOME": str(home), "PYTHONPATH": str(tree),
           "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor-cache")}
    start = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "nanochat.cli", *args], cwd=tree, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"`nanochat {shlex.join(args)}` in {tree} failed (exit {proc.returncode}); see {log}")
    return seconds


def final_bpb(home: Path) -> float | None:
    """The last validation bpb of the base stage in runs/tiny/metrics.jsonl (read as plain JSON, so
    that either side's metrics format does; the base stage was called "pretrain" once)."""
    bpb = None
    with (home / "runs" / "tiny" / "metrics.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            if record.get("stage", "base") in ("base", "pretrain") and "val_bpb" in record:
                bpb = record["val_bpb"]
    return bpb


def run_side(tree: Path, what: str, extra: list[str], where: Path, label: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"home-{label}-", dir=where))
    log = home / "log.txt"
    result: dict = {}
    if what == "pretrain":
        nanochat(tree, home, ["data", "offline"], log)
        nanochat(tree, home, ["tokenizer", "train", "--preset", "tiny"], log)
        result["seconds"] = nanochat(tree, home, ["pretrain", "--preset", "tiny", *extra], log)
    else:
        result["seconds"] = nanochat(tree, home, ["speedrun", *extra], log)
        stages = json.loads((home / "runs" / "tiny" / "speedrun.json").read_text())["stages"]
        result["stages"] = {s["stage"]: s["seconds"] for s in stages}
    result["bpb"] = final_bpb(home)
    print(f"{label}: {result['seconds']:.1f} s, base bpb {result['bpb']}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--what", choices=("pretrain", "speedrun"), default="pretrain")
    ap.add_argument("--old-args", default="", help="extra flags for the earlier commit's command")
    ap.add_argument("--new-args", default="", help="extra flags for today's command")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    ap.add_argument("--keep", action="store_true", help="keep the worktree and homes (printed) for a look")
    args = ap.parse_args()
    if not (ROOT / EXTENSION).is_file():
        raise SystemExit(f"{EXTENSION} is missing: build it first (`uv sync`)")
    where = Path(tempfile.mkdtemp(prefix="nanochat-against-"))
    tree = checkout(args.rev, where)
    sides = {"old": (tree, shlex.split(args.old_args)), "new": (ROOT, shlex.split(args.new_args))}
    results: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        for i in range(args.repeats):
            for label, (side_tree, extra) in sides.items():
                results[label].append(run_side(side_tree, args.what, extra, where, f"{label}{i + 1}"))
    finally:
        if args.keep:
            print(f"kept {where}", file=sys.stderr)
        else:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
            shutil.rmtree(where, ignore_errors=True)

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev], capture_output=True,
                         text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    names = {"old": f"{args.rev} ({rev}) {args.old_args}".strip(), "new": f"today ({head}) {args.new_args}".strip()}
    stage_names = list(results["new"][0].get("stages", {}))
    print(f"\n`nanochat {args.what}` back to back, median of {args.repeats} run(s) per side\n")
    print("| commit | " + "".join(f"{s} | " for s in stage_names) + "wall-clock | base val bpb |")
    print("|---|" + "---:|" * (len(stage_names) + 2))
    median = {label: statistics.median(r["seconds"] for r in rs) for label, rs in results.items()}
    for label, rs in results.items():
        cells = "".join(f"{statistics.median(r['stages'].get(s, 0.0) for r in rs):.1f} | " for s in stage_names)
        bpbs = [r["bpb"] for r in rs if r["bpb"] is not None]
        bpb = f"{statistics.median(bpbs):.4f}" if bpbs else "—"
        print(f"| {names[label]} | {cells}{median[label]:.1f} s | {bpb} |")
    print(f"\nnew / old wall-clock: {median['new'] / median['old']:.3f}×")


if __name__ == "__main__":
    main()
