"""`nanochat speedrun`: every stage, in order, from one command.

On a CPU it picks the `tiny` preset on the offline corpus (minutes on 2 cores); with GPUs, `d20`
on FineWeb-Edu (with the CORE eval bundle), launching `torchrun` with one process per GPU for the training stages. Each
stage runs through the same `nanochat <command>` a user would type, so the speedrun does nothing a user
could not do by hand. Finished stages are skipped on a re-run, and an interrupted pretraining is
resumed. It ends by saying how to talk to the chat model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from nanochat import cli as nanochat_cli
from nanochat.checkpoint import read_meta
from nanochat.config import PRESETS, SpeedrunConfig, home, parse_config, run_dir, tokenizer_dir
from nanochat.data.offline import build_offline_corpus
from nanochat.data.sources import resolve_source
from nanochat.runs import STAGES, is_finished, latest, most_finished
from nanochat.runtime import torchrun_env


def _run_stage(argv: list[str], nproc: int) -> None:
    """Run a `nanochat` command in this process, or under torchrun when several processes are wanted."""
    if nproc <= 1 or torchrun_env() is not None:
        code = nanochat_cli.main(argv)
        if code:
            raise SystemExit(code)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "nanochat.cli", "--", *argv]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def _earlier_timings(run: str) -> dict[str, float]:
    """Seconds of each stage an earlier speedrun of `run` ran to the end (none if there was none, or
    its summary is unreadable: the times are only a report's figures)."""
    try:
        stages = json.loads((run_dir(run) / "speedrun.json").read_text())["stages"]
        return {s["stage"]: float(s["seconds"]) for s in stages if s["status"] in ("done", "done earlier")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_summary(run: str, preset: str, data: str, timings: list[tuple[str, str, float]]) -> None:
    summary = {"preset": preset, "run": run, "data": data, "stages": [
        {"stage": n, "status": s, "seconds": round(t, 2)} for n, s, t in timings]}
    out = run_dir(run) / "speedrun.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))


def cli(argv: list[str]) -> int:
    cfg = parse_config(SpeedrunConfig, argv, prog="nanochat speedrun",
                       description="Run every stage: data, tokenizer, pretraining, … then tell how to chat.")
    gpus = torch.cuda.device_count()
    preset = cfg.preset if cfg.preset != "auto" else ("d20" if gpus else "tiny")
    train = PRESETS[preset]
    run = cfg.run or train.run
    data = cfg.data or train.data
    nproc = cfg.nproc or max(gpus, 1)
    tok_name = train.tokenizer
    timings: list[tuple[str, str, float]] = []
    earlier = _earlier_timings(run)
    print(f"speedrun: preset {preset}, run {run}, data {data}, {nproc} process(es); home {home()}\n", flush=True)

    def stage(name: str, skip_reason: str | None, action) -> None:
        print(f"=== {name} ===", flush=True)
        if skip_reason:
            print(f"skipped: {skip_reason}\n", flush=True)
            # A stage finished by an earlier speedrun keeps its time, so that the total is the run's.
            timings.append((name, "done earlier", earlier[name]) if name in earlier else (name, "skipped", 0.0))
            return
        start = time.perf_counter()
        action()
        timings.append((name, "done", time.perf_counter() - start))
        print(flush=True)

    def get_data() -> None:
        if data == "offline":
            print(build_offline_corpus())
        elif data == "fineweb":  # online: the shards, and the CORE bundle for the base model's evaluation
            _run_stage(["data", "download", "-n", str(cfg.shards)], 1)
            _run_stage(["data", "core-bundle"], 1)
        else:
            resolve_source(data)  # validates the folder's layout up front

    stage("data", None, get_data)
    tok_done = (tokenizer_dir(tok_name) / "tokenizer.json").is_file()
    tok_inputs = ["--inputs", data]
    stage("tokenizer train", f"tokenizer '{tok_name}' exists in {tokenizer_dir(tok_name)}" if tok_done else None,
          lambda: _run_stage(["tokenizer", "train", "--preset", preset, *tok_inputs], 1))
    stage("tokenizer eval", None, lambda: _run_stage(
        ["tokenizer", "eval", "--name", tok_name, *tok_inputs, "--out", str(run_dir(run) / "tokenizer.json")], 1))

    for s in STAGES:  # the training stages, in order: each is skipped when done, resumed when interrupted
        last, finished = latest(run, s.name), is_finished(run, s.name)
        argv = [s.command, "--preset", preset, "--run", run] + (["--data", data] if s.name == "base" else [])
        argv += ["--resume"] if last and not finished else []
        stage(s.command, f"{s.name} of run '{run}' already finished ({last})" if finished else None,
              lambda argv=argv: _run_stage(argv, nproc))

    stage("eval", None, lambda: _run_stage(["eval", "--run", run], nproc))
    _write_summary(run, preset, data, timings)  # the report reads the timings
    stage("report", None, lambda: _run_stage(["report", "--run", run], 1))

    total = sum(t for _, _, t in timings)
    print("| stage | status | seconds |\n|---|---|---:|")
    for name, status, seconds in timings:
        print(f"| {name} | {status} | {seconds:.1f} |")
    print(f"| total | | {total:.1f} |")
    _write_summary(run, preset, data, timings)
    last = latest(run, "base")
    if last is not None:
        bpb = read_meta(last, verify=False).get("val_bpb")
        print(f"\nbase model: {last} (validation bits per byte {bpb:.4f})" if bpb else f"\nbase model: {last}")
    chat = most_finished(run, ("sft", "rl"))  # what `nanochat chat` loads: RL's model once it exists
    if chat is not None:
        print(f"chat model: {chat[1]}\ntalk to it: `nanochat chat --run {run}` in the terminal, or "
              f"`nanochat serve --run {run}` for the web UI and the OpenAI-compatible API")
    return 0

