"""`nanochat <command>`: one subcommand per stage, each implemented by the module of the same name.

The first word picks the command; the module's `cli(argv)` parses the rest into its typed config
(see config.py). A command's module is imported (by name, through importlib) only when that
command runs: most of them pull in torch, and `nanochat --help` should not wait for it.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from nanochat import __version__
from nanochat.errors import NanochatError

# command -> ("module" whose `cli(argv) -> int` runs it, or "module:function"; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "speedrun": ("nanochat.speedrun", "every stage from one command (tiny on a CPU, d20 on GPUs)"),
    "info": ("nanochat.runtime:info_cli", "versions, devices, torchrun rank and NANOCHAT_HOME"),
    "data": ("nanochat.data.cli", "download FineWeb-Edu shards, build the offline corpus, corpus stats"),
    "tokenizer": ("nanochat.train.tokenizer", "train a BPE tokenizer; bytes per token vs cl100k/o200k"),
    "verify-model": ("nanochat.verify_model", "sanity check: overfit one random batch to loss ≤ 0.01"),
    "pretrain": ("nanochat.train.pretrain", "base pretraining (--preset tiny|d12|d20|d26, torchrun-ready)"),
    "midtrain": ("nanochat.train.chat:midtrain_cli", "teach the chat format, tools and identity (base -> mid)"),
    "sft": ("nanochat.train.chat:sft_cli", "supervised fine-tuning on conversations (mid -> sft)"),
    "rl": ("nanochat.train.rl:cli", "reinforcement learning on verifiable rewards (sft -> rl)"),
    "eval": ("nanochat.evaluate.cli", "bpb and CORE (base); chat evaluations, ChatCORE, pass@k (mid, sft, rl)"),
    "report": ("nanochat.report", "the run's report card: report.md with tables and plots"),
    "chat": ("nanochat.chat", "talk to a trained model in the terminal (multi-turn, or one-shot with -p)"),
    "serve": ("nanochat.serve.app", "web chat UI and OpenAI-compatible API (FastAPI + uvicorn)"),
    "export": ("nanochat.export.cli", "a trained model as a Hugging Face transformers directory (GGUF: refused, why)"),
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


if __name__ == "__main__":
    sys.exit(main())
