"""`nanochat eval`: bits per byte and CORE for the base model, chat evaluations (ChatCORE) for the
mid, SFT and RL models, and for the SFT and RL models of a run that has an RL stage, pass@1 and
pass@k on RL's held-out questions with RL's sampling settings; one JSON file per stage in
runs/<run>/eval/, which the report card reads."""

from __future__ import annotations

import json
from pathlib import Path

from nanochat.checkpoint import read_meta
from nanochat.config import EvalConfig, home, parse_config, run_dir
from nanochat.data.loader import DataLoader
from nanochat.data.sources import resolve_source
from nanochat.engine import Engine
from nanochat.evaluate.bpb import evaluate_bpb, token_byte_lengths
from nanochat.evaluate.chat import evaluate_chat
from nanochat.evaluate.core import evaluate_core
from nanochat.evaluate.passk import PassAtK, rl_sampling
from nanochat.gpt import GPT
from nanochat.runs import latest, load_stage_model
from nanochat.runtime import Runtime, init_runtime, print0, teardown
from nanochat.tokenizer import Tokenizer


def evaluate_base(model: GPT, tok: Tokenizer, meta: dict, cfg: EvalConfig, rt: Runtime) -> tuple[dict, dict]:
    """Validation bits per byte on the run's own data, and CORE when an eval bundle is present."""
    config = meta["config"]
    T = model.config.sequence_len
    val = DataLoader(resolve_source(config["data"], config["text_field"]), tok, 8, T, "val", rt.device,
                     rt.rank, rt.world_size)
    try:
        results = {"val_bpb": evaluate_bpb(model, val, token_byte_lengths(tok, rt.device), rt,
                                           max_batches=max(1, cfg.bpb_tokens // (8 * T * rt.world_size)))}
    finally:
        val.close()
    bundle = Path(cfg.core_bundle) if cfg.core_bundle else home() / "data" / "eval_bundle"
    if not (bundle / "core.yaml").is_file():
        print0(f"CORE: skipped, no eval bundle in {bundle} (fetch it with `nanochat data core-bundle`, "
               "or pass --core-bundle DIR)")
        return results, {}
    core = evaluate_core(model, tok, bundle, rt, max_per_task=cfg.core_max_per_task or None)
    results["core"] = core["core"]
    results.update({f"core/{label}": r["centered"] for label, r in core["tasks"].items()})
    return results, core["tasks"]


def evaluate_stage(stage: str, cfg: EvalConfig, rt: Runtime) -> tuple[dict, dict] | None:
    """({metric: value}, each task's counts and baseline) for one stage of the run (chat tasks:
    accuracy, centered, correct, total, baseline; CORE tasks: accuracy, centered, n, baseline), or
    None when the run has no such model."""
    if latest(cfg.run, stage) is None:
        return None
    model, tok, meta = load_stage_model(cfg.run, stage, rt)
    if stage == "base":
        return evaluate_base(model, tok, meta, cfg, rt)
    chat = evaluate_chat(model, tok, rt, tasks=cfg.chat_tasks, max_items=cfg.max_items or None)
    results = {"chatcore": chat["chatcore"], **{name: r["accuracy"] for name, r in chat["tasks"].items()}}
    rl = latest(cfg.run, "rl")
    if cfg.pass_at_k and stage in ("sft", "rl") and rl is not None:
        sampling = rl_sampling(read_meta(rl, verify=False)["config"])
        results.update(PassAtK(Engine(model, tok, rt), sampling, rt).evaluate())
    return results, chat["tasks"]


def cli(argv: list[str]) -> int:
    cfg = parse_config(EvalConfig, argv, prog="nanochat eval", description=__doc__.split("\n\n")[0])
    rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype, seed=0)
    try:
        out_dir = run_dir(cfg.run) / "eval"
        for stage in cfg.stages:
            evaluated = evaluate_stage(stage, cfg, rt)
            if evaluated is None:
                print0(f"{stage}: the run has no {stage} model, skipped")
                continue
            results, details = evaluated
            if rt.master:
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = out_dir / f"{stage}.json.tmp"
                tmp.write_text(json.dumps({**results, "details": details}, indent=2))
                tmp.replace(out_dir / f"{stage}.json")
            print0(f"{stage}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    finally:
        teardown()
    return 0
