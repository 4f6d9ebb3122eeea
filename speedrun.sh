#!/usr/bin/env bash
# The GPU recipe, one stage per line: what `nanochat speedrun` does on an 8×H100 node.
# Read it, change it, run it:  bash speedrun.sh   (NANOCHAT_HOME defaults to ~/.cache/nanochat)
set -euo pipefail
cd "$(dirname "$0")"

NPROC=${NPROC:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)}
RUN=${RUN:-d20}

uv sync --locked                                   # build the Rust tokenizer and install everything

# 1. Data: the first 240 FineWeb-Edu shards (~24 GB; the last one is the validation split).
uv run nanochat data download -n 240

# 2. Tokenizer: 65,536-token BPE on ~2B characters, then bytes/token against cl100k and o200k.
uv run nanochat tokenizer train --preset d20 --inputs fineweb
uv run nanochat tokenizer eval --name default --inputs fineweb

# 3. Base pretraining of d20 (~561M parameters, ~20 tokens per parameter) on all GPUs.
#    Add --resume to continue an interrupted run from its latest checkpoint.
uv run torchrun --standalone --nproc_per_node="$NPROC" -m nanochat.cli -- pretrain --preset d20 --run "$RUN"

# 4. Midtraining, SFT and RL (GSM8K, downloaded once), each continuing the stage before it.
uv run torchrun --standalone --nproc_per_node="$NPROC" -m nanochat.cli -- midtrain --preset d20 --run "$RUN"
uv run torchrun --standalone --nproc_per_node="$NPROC" -m nanochat.cli -- sft --preset d20 --run "$RUN"
uv run torchrun --standalone --nproc_per_node="$NPROC" -m nanochat.cli -- rl --preset d20 --run "$RUN"

# 5. Evaluation of every stage, then the report card (runs/$RUN/report.md).
uv run nanochat data core-bundle
uv run torchrun --standalone --nproc_per_node="$NPROC" -m nanochat.cli -- eval --run "$RUN"
uv run nanochat report --run "$RUN"

# Talk to it: `uv run nanochat chat --run $RUN`, or `uv run nanochat serve --run $RUN`.
