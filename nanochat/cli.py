"""`nanochat <command>`: one subcommand per stage, each implemented by the module of the same name.

The first word picks the command; the module's `cli(argv)` parses the rest into its typed config
(see config.py). Modules are imported only when their command runs, so `nanochat --help` is quick.
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys
from dataclasses import dataclass

from nanochat.errors import NanochatError

# command -> ("module" whose `cli(argv) -> int` runs it, or "module:function"; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "speedrun": ("nanochat.speedrun", "every stage from one command (tiny on a CPU, d20 on GPUs)"),
    "info": ("nanochat.cli", "versions, devices, torchrun rank and NANOCHAT_HOME"),
    "data": ("nanochat.data.cli", "download FineWeb-Edu shards, build the offline corpus, corpus stats"),
    "tokenizer": ("nanochat.tokenizer", "train a BPE tokenizer; bytes per token vs cl100k/o200k"),
    "verify-model": ("nanochat.verify_model", "sanity check: overfit one random batch to loss ≤ 0.01"),
    "pretrain": ("nanochat.train.pretrain", "base pretraining (--preset tiny|d12|d20|d26, torchrun-ready)"),
    "midtrain": ("nanochat.train.chat:midtrain_cli", "teach the chat format, tools and identity (base -> mid)"),
    "sft": ("nanochat.train.chat:sft_cli", "supervised fine-tuning on conversations (mid -> sft)"),
    "eval": ("nanochat.evaluate.cli", "bpb and CORE (base), chat evaluations and ChatCORE (mid, sft)"),
    "report": ("nanochat.report", "the run's report card: report.md with tables and plots"),
    "chat": ("nanochat.chat", "talk to a trained model in the terminal (multi-turn, or one-shot with -p)"),
    "serve": ("nanochat.serve.app", "web chat UI and OpenAI-compatible API (FastAPI + uvicorn)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: nanochat <command> [options]   (nanochat <command> --help for its options)\n\n"
            "Train your own small ChatGPT from scratch.\n\ncommands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from nanochat import __version__

        print(f"nanochat {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"nanochat: unknown command '{command}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[command][0].partition(":")
    run = getattr(importlib.import_module(module_name), function or "cli")
    try:
        return run(rest) or 0
    except NanochatError as e:
        print(f"nanochat {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nnanochat {command}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# nanochat info


@dataclass
class InfoConfig:
    json: bool = False
    """Print machine-readable JSON instead of a table."""


def cli(argv: list[str]) -> int:
    """`nanochat info`."""
    from nanochat.config import parse_config
    from nanochat.runtime import describe

    cfg = parse_config(InfoConfig, argv, prog="nanochat info", description="Show the environment nanochat runs in.")
    info = describe()
    if cfg.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("nanochat", info["nanochat"]), ("torch", f"{info['torch']} (CUDA {info['cuda'] or 'none'})"),
            ("numpy", info["numpy"]), ("default device", info["default_device"])]
    for d in info["devices"]:
        extra = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("type", "name") and v is not None)
        rows.append((f"device {d['type']}", d["name"] + (f" ({extra})" if extra else "")))
    tr = info["torchrun"]
    rows.append(("torchrun", "no" if tr is None else f"rank {tr['rank']} of {tr['world_size']}, "
                                                      f"local rank {tr['local_rank']}"))
    rows.append(("NANOCHAT_HOME", f"{info['home']} ({info['home_free_gib']} GiB free)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
