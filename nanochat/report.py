"""`nanochat report`: the report card of a run — `runs/<run>/report.md` with PNG plots beside it.

Everything in it is read from what the run wrote: `metrics.jsonl` (every stage logs there),
the checkpoints' meta.json, `speedrun.json` (stage timings) and `eval/*.json` (evaluation results,
one file per model stage). A number the run did not produce is shown as "—", never invented.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from nanochat.checkpoint import read_meta  # noqa: E402
from nanochat.config import ReportConfig, parse_config, run_dir  # noqa: E402
from nanochat.errors import NanochatError  # noqa: E402
from nanochat.metrics import read_metrics  # noqa: E402
from nanochat.runs import STAGE_NAMES, build_model, latest, stage_name  # noqa: E402
from nanochat.runtime import describe  # noqa: E402

# `nanochat eval` metrics with a headline title; per-task scores keep their task name
EVAL_TITLES = {"val_bpb": "validation bpb (`nanochat eval`)", "core": "CORE (centered)",
               "chatcore": "ChatCORE (centered)"}


def _fmt(value, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _plot(path: Path, title: str, series: list[tuple[str, list[int], list[float]]], ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(run: str, gpu_hour_usd: float = 2.5) -> Path:
    folder = run_dir(run)
    metrics_path = folder / "metrics.jsonl"
    if not metrics_path.is_file():
        raise NanochatError(f"run '{run}' has no metrics in {folder}; train it first (`nanochat speedrun` or "
                            "`nanochat pretrain`)")
    records = list(read_metrics(metrics_path))
    by_stage = {name: [r for r in records if stage_name(r.get("stage")) == name] for name in STAGE_NAMES}
    env = describe()
    lines = [f"# nanochat report: run `{run}`", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{folder}`.", "", "## Environment", "",
             "| | |", "|---|---|", f"| commit | {_git_commit()} |",
             f"| nanochat / torch | {env['nanochat']} / {env['torch']} |"]
    lines += [f"| device | {d['type']}: {d['name']} |" for d in env["devices"]]
    lines += ["", "## Stages", "",
              "| stage | steps | parameters | data seen | wall-clock | mean tok/s | mean MFU "
              "| final loss | validation |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    tokenizer_meta = None
    for name in STAGE_NAMES:
        steps = [r for r in by_stage[name] if "loss" in r]
        ckpt = latest(run, name)
        meta = read_meta(ckpt, verify=False) if ckpt else {}
        tokenizer_meta = tokenizer_meta or meta.get("tokenizer")
        if not steps:
            lines.append(f"| {name} | — | — | — | — | — | — | — | not run |")
            continue
        params = _num_params(meta)
        tok_s = [r["tok_per_s"] for r in steps if r.get("tok_per_s")]
        mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
        config = meta.get("config", {})
        positions = sum(r.get("tokens", 0) for r in steps)  # the chat stages log what each step processed
        volume = (f"{config['total_batch_tokens'] * len(steps):,} tokens" if name == "base" and config
                  else f"{config['prompts_per_step'] * config['samples'] * len(steps):,} completions"
                  if name == "rl" and config
                  else f"{config.get('batch_size', 0) * len(steps):,} sequences" if config else "—")
        if positions and name != "base":
            volume += f" ({positions:,} tokens)"
        val = [r for r in by_stage[name] if "val_bpb" in r or "val_loss" in r]
        val_text = (f"bpb {val[-1]['val_bpb']:.4f}" if val and "val_bpb" in val[-1]
                    else f"loss {val[-1]['val_loss']:.4f}" if val else "—")
        mean_tok_s = _fmt(sum(tok_s) / len(tok_s) if tok_s else None, ",.0f")
        mean_mfu = _fmt(sum(mfus) / len(mfus) if mfus else None, ".1%")
        lines.append(f"| {name} | {len(steps)} | {_fmt(params, ',') if params else '—'} | {volume} | "
                     f"{steps[-1].get('elapsed', 0):.0f} s | {mean_tok_s} | {mean_mfu} | {steps[-1]['loss']:.4f} "
                     f"| {val_text} |")
    if not any(r.get("mfu") is not None for name in STAGE_NAMES for r in by_stage[name]):
        lines += ["", "MFU is shown where the device's peak FLOP/s is known (the GPUs in "
                      "`nanochat.runtime.PEAK_BF16_FLOPS`); this run's device is not one of them."]
    lines += _tokenizer_section(folder / "tokenizer.json", tokenizer_meta)

    lines += ["", "## Curves", ""]
    pre = [r for r in by_stage["base"] if "loss" in r]
    if pre:
        _plot(folder / "pretrain_loss.png", "pretraining loss", [("train loss", [r["step"] for r in pre],
                                                                 [r["loss"] for r in pre])], "loss (nats/token)")
        lines.append("![pretraining loss](pretrain_loss.png)")
    bpb = [r for r in by_stage["base"] if "val_bpb" in r]
    if bpb:
        _plot(folder / "val_bpb.png", "validation bits per byte", [("val bpb", [r["step"] for r in bpb],
                                                                    [r["val_bpb"] for r in bpb])], "bits per byte")
        lines.append("![validation bpb](val_bpb.png)")
    chat_series = [(name, [r["step"] for r in rs], [r["loss"] for r in rs]) for name in ("mid", "sft")
                   if (rs := [r for r in by_stage[name] if "loss" in r])]
    if chat_series:
        _plot(folder / "chat_loss.png", "chat stages: loss on assistant tokens", chat_series, "loss (nats/token)")
        lines.append("![chat loss](chat_loss.png)")
    rl_steps = [r for r in by_stage["rl"] if "reward" in r]
    if rl_steps:
        _plot(folder / "rl_reward.png", "RL: mean reward of each step's completions",
              [("reward", [r["step"] for r in rl_steps], [r["reward"] for r in rl_steps])], "reward")
        lines.append("![RL reward](rl_reward.png)")

    lines += ["", "## Evaluation", "", "| metric | " + " | ".join(n.upper() for n in STAGE_NAMES) + " |",
              "|---|" + "---:|" * len(STAGE_NAMES)]
    results = {name: _final(by_stage[name]) for name in STAGE_NAMES}
    evals = {name: _eval_file(folder / "eval" / f"{name}.json") for name in STAGE_NAMES}
    rows = [("validation bpb, last of pretraining", lambda lab: results[lab].get("val_bpb") if lab == "base" else None),
            ("held-out answers, bits per byte", lambda lab: results["mid"].get("answer_bpb_base") if lab == "base"
             else results[lab].get("answer_bpb")),
            ("closes its turn (held-out prompts)", lambda lab: results[lab].get("assistant_end_rate"))]
    evaluated = {k for e in evals.values() for k in e}
    # RL's held-out pass@k, sampled: `nanochat eval`'s when it measured them, else the RL stage's own
    # (its SFT column measured before the first step)
    for key in sorted(k for k in results["rl"] if "_pass@" in k and not k.startswith("before_") and k not in evaluated):
        rows.append((f"{key} (sampled, held-out)", lambda lab, key=key: results["rl"].get(f"before_{key}")
                     if lab == "sft" else results["rl"].get(key) if lab == "rl" else None))
    for key in sorted(evaluated, key=lambda k: (k not in EVAL_TITLES, k)):
        title = EVAL_TITLES.get(key, f"{key} (sampled, held-out)" if "_pass@" in key else key)
        rows.append((title, lambda lab, key=key: evals[lab].get(key)))
    for title, get in rows:
        lines.append(f"| {title} | " + " | ".join(_fmt(get(lab), ".4f") for lab in STAGE_NAMES) + " |")

    samples = next((r["samples"] for r in reversed(by_stage["sft"]) if r.get("samples")), None)
    if samples:
        lines += ["", "## Sample chats (SFT, greedy)", ""]
        for s in samples:
            lines += [f"> **user:** {s['user']}  ", f"> **assistant:** {s['assistant']}", ""]

    speedrun = folder / "speedrun.json"
    total = None
    if speedrun.is_file():
        stages = json.loads(speedrun.read_text())["stages"]
        total = sum(s["seconds"] for s in stages)
        lines += ["", "## Wall-clock", "", "| stage | status | seconds |", "|---|---|---:|"]
        lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} |" for s in stages]
        lines.append(f"| total | | {total:.1f} |")
    gpus = sum(d["type"] == "cuda" for d in env["devices"])
    cost = (f"≈ ${total / 3600 * gpus * gpu_hour_usd:,.2f} ({gpus} GPU × {total / 3600:.2f} h × "
            f"${gpu_hour_usd}/GPU-hour)" if total and gpus else "not priced (no GPU)")
    lines += ["", f"Estimated cost: {cost}.", ""]
    out = folder / "report.md"
    out.write_text("\n".join(lines))
    return out


def _tokenizer_section(stats_path: Path, identity: dict | None) -> list[str]:
    """The tokenizer the models were trained with, and its compression on held-out text next to
    cl100k_base / o200k_base (from `nanochat tokenizer eval --out`, which the speedrun runs)."""
    lines = ["", "## Tokenizer", ""]
    if identity:
        lines.append(f"`{identity['name']}`: {identity['vocab_size']:,} tokens (sha256 {identity['sha256'][:12]}…).")
    stats = _json_file(stats_path, "nanochat tokenizer eval --out") if stats_path.is_file() else None
    if stats is None:
        return lines + ["", "No tokenizer evaluation in this run (`nanochat tokenizer eval --out "
                            f"{stats_path}` writes one)."]
    ours = stats["tokenizers"][0]
    lines += ["", f"Held-out text: {stats['documents']:,} documents, {stats['bytes']:,} bytes. "
                  f"{stats['special_tokens']} special tokens.", "",
              f"| tokenizer | vocabulary | tokens | bytes per token | tokens vs `{ours['name']}` |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {t['name']} | {t['vocab_size']:,} | {t['tokens']:,} | {t['bytes_per_token']:.3f} | "
              f"{t['tokens'] / ours['tokens']:.2f}× |" for t in stats["tokenizers"]]
    return lines


def _json_file(path: Path, remedy: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NanochatError(f"{path} is corrupt ({e}); rerun `{remedy}`") from None


def _final(records: list[dict]) -> dict:
    """The last value of every metric a stage logged."""
    merged: dict = {}
    for r in records:
        merged.update({k: v for k, v in r.items() if v is not None})
    return merged


def _eval_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = _json_file(path, "nanochat eval")
    return {k: v for k, v in data.items() if isinstance(v, (int, float))}


def _num_params(meta: dict) -> int | None:
    if "config" not in meta or "tokenizer" not in meta:
        return None
    return build_model(meta).num_params()


def cli(argv: list[str]) -> int:
    cfg = parse_config(ReportConfig, argv, prog="nanochat report", description="Write the report card of a run.")
    print(build_report(cfg.run, cfg.gpu_hour_usd))
    return 0
