"""Typed configuration: one dataclass per command, presets by name, command-line overrides.

The rule: every command's options are a dataclass here (so `nanochat <command> --help` and this
file tell the same story), built from shared groups — `ModelConfig` (the model's shape: the one
config the GPT is built from), `OptimConfig`, `DeviceConfig` (`--device`, `--dtype`) and
`ModelSource` (which trained model to load). Commands import their config; this module imports
nothing of nanochat but its errors.

Every field of a stage's config can be overridden on the command line. Model fields are
top-level flags (`--depth 12`); other nested groups keep their prefix (`--optim.matrix-lr 0.01`).
Parsing is done by `tyro`; validation lives in each dataclass's `__post_init__`, so a bad
value is refused whether it came from a preset, a flag or Python code.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import tyro

from nanochat.errors import NanochatError

C = TypeVar("C")


class ConfigError(NanochatError, ValueError):
    """A configuration value the user chose is invalid; the message names the field."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_positive(cfg: object, *names: str, allow_zero: bool = False) -> None:
    """Refuse non-positive (or negative, with allow_zero) numeric fields, naming the flag."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = "≥ 0" if allow_zero else "> 0"
            raise ConfigError(f"{_flag(name)} must be {bound} (got {value})")


def check_fraction(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{_flag(name)} must be between 0 and 1 (got {value})")


# --------------------------------------------------------------------------------------------
# Where things live


def home() -> Path:
    """NANOCHAT_HOME: data, tokenizers and runs (default ~/.cache/nanochat)."""
    return Path(os.environ.get("NANOCHAT_HOME", Path.home() / ".cache" / "nanochat")).expanduser()


def tokenizer_dir(name: str) -> Path:
    return home() / "tokenizers" / name


def run_dir(run: str) -> Path:
    return home() / "runs" / run


# --------------------------------------------------------------------------------------------
# Where a command runs (one group, shared by every command that runs a model)


@dataclass
class DeviceConfig:
    """`--device` and `--dtype`, the same two flags on every command that runs a model."""

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """`auto`: CUDA when present, else MPS, else the CPU."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """`auto`: bfloat16 autocast where the hardware multiplies bf16 (CUDA sm80+, CPUs with
    AVX512-BF16 or AMX), float32 elsewhere."""


Device = Annotated[DeviceConfig, tyro.conf.OmitArgPrefixes]


# --------------------------------------------------------------------------------------------
# Model and training


# Fields added to ModelConfig after checkpoints were first written, with the value they had before.
MODEL_FIELDS_ADDED = {"value_embeddings": False, "x0_skip": False, "value_embed_every": 2, "ve_gate": False,
                      "smear": False, "bigram_multiple": 0, "attn_scale": 0.0}


@dataclass
class ModelConfig:
    """The transformer's shape, the one config `GPT(config, vocab_size)` is built from (the
    vocabulary comes from the tokenizer). Width follows depth: n_embd = depth * aspect_ratio,
    rounded up to a whole number of heads, so one number (`--depth`) picks a model from the
    d12/d20/d26 family."""

    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means one per query head (no GQA)."""
    sequence_len: int = 2048
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    rope_theta: float = 10000.0
    qk_norm: bool = True
    logit_softcap: float = 15.0
    """tanh soft-cap on the output logits; 0 disables it."""
    tie_embeddings: bool = False
    value_embeddings: bool = True
    """Every other layer, counting down from the last, adds a per-token embedding of its own to the
    attention values (modded-nanogpt's value embeddings): token identity the deep layers can read
    without carrying it through the residual stream. On by default: −2.9% validation bpb on the
    tiny shape at equal tokens (benchmarks/recipe.py); the rule scales with depth."""
    value_embed_every: int = 2
    """With value embeddings: every how many layers (from the last down) one is added; 1 = every layer."""
    ve_gate: bool = False
    """Scale each head's value embedding by 2·sigmoid(W·x[:, :32]) (init 1): a layer can turn it down per token."""
    smear: bool = True
    """Add a gated copy of the previous token's embedding to each token's (modded-nanogpt's smear):
    the previous-token signal the first attention layer would otherwise spend itself on.
    −0.4% validation bpb on the tiny shape alone, −0.25% on top of the bigram table."""
    bigram_multiple: int = 4
    """Add a learned embedding of the (previous, current) token pair, hashed into a table of this
    many rows per vocabulary row (modded-nanogpt's bigram hash embedding); 0 = off. The largest
    win of the recipe ablation: −2.7% validation bpb on the tiny shape at ×4, −4.2% at ×16. A lookup,
    not a matmul, so no FLOPs; but its gradient and AdamW state are dense, a few percent of a tiny
    step on two CPU threads. Its rows cost memory: ×4 is what the GPU presets afford
    (262,144 × n_embd), the tiny preset takes ×16."""
    attn_scale: float = 0.0
    """Attention logit scale; 0 = 1/sqrt(head_dim). With QK-norm, a larger scale lets heads attend sharper."""
    x0_skip: bool = False
    """Before each block, x <- a_i·x + b_i·x0 with learned scalars (init 1 and 0) and x0 the
    normed token embedding (modded-nanogpt's x0 mix-in): every layer sees the raw tokens."""

    def __post_init__(self) -> None:
        check_positive(self, "depth", "aspect_ratio", "head_dim", "sequence_len", "rope_theta")
        check_positive(self, "n_kv_head", "logit_softcap", "bigram_multiple", "attn_scale", allow_zero=True)
        check_positive(self, "value_embed_every")
        if self.head_dim % 2:
            raise ConfigError(f"--head-dim must be even: rotary embeddings turn pairs of channels "
                              f"(got {self.head_dim})")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ConfigError(f"--n-kv-head ({self.n_kv_head}) must divide the {self.n_head} query heads")

    @property
    def n_head(self) -> int:
        return -(-self.depth * self.aspect_ratio // self.head_dim)

    @property
    def n_embd(self) -> int:
        return self.n_head * self.head_dim

    @classmethod
    def from_saved(cls, saved: dict) -> ModelConfig:
        """The shape a checkpoint's meta.json records; a field the checkpoint predates takes the
        value every model had before the field existed (so old checkpoints keep loading)."""
        return cls(**{**MODEL_FIELDS_ADDED, **saved})

    def has_value_embedding(self, layer: int) -> bool:
        """Whether `layer` adds a value embedding: the last layer and every other one below it."""
        return self.value_embeddings and (self.depth - 1 - layer) % self.value_embed_every == 0

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_head, or one per query head)."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        """ReLU²: 4·n_embd (two matrices, 8·n_embd² parameters). SwiGLU has three matrices, so its
        hidden size is 8/3·n_embd, rounded up to a multiple of 64, for about the same parameters."""
        if self.mlp == "relu2":
            return 4 * self.n_embd
        return -(-8 * self.n_embd // (3 * 64)) * 64


@dataclass
class OptimConfig:
    optimizer: Literal["muon", "adamw"] = "muon"
    matrix_lr: float = 0.02
    """Muon learning rate for the 2-D matrices inside the blocks."""
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    scalar_lr: float = 0.04
    adamw_matrix_lr: float = 0.003
    """Learning rate of the block matrices when --optim.optimizer adamw replaces Muon."""
    muon_momentum: float = 0.95
    muon_momentum_warmup: int = 300
    """Steps over which Muon's momentum rises from 0.85 to --optim.muon-momentum."""
    muon_embeddings: bool = False
    """Put the token embedding on Muon too (measured worse on the tiny preset; see README)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the Muon matrices."""
    cautious_weight_decay: bool = False
    """Decay a weight only where its update points the same way, i.e. also shrinks it (cautious
    weight decay, Chen et al. 2025): decay then never fights the gradient."""
    normuon: bool = False
    """Normalise Muon's orthogonalised update per output neuron by a running second moment, then
    restore its overall norm (NorMuon, Li et al. 2025): rows the update keeps pushing hard are
    tempered, as Adam does per entry."""
    muon_momentum_cooldown: bool = False
    """Let Muon's momentum fall back to 0.85 over the learning-rate warmdown (modded-nanogpt)."""
    reference_batch_tokens: int = 524288
    """The batch the learning rates above are tuned for; other batches scale them by sqrt(batch / this)."""
    warmup_frac: float = 0.0
    warmdown_frac: float = 0.2
    final_lr_frac: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self, "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "adamw_matrix_lr")
        check_positive(self, "reference_batch_tokens")
        check_positive(self, "weight_decay", "muon_momentum_warmup", allow_zero=True)
        check_fraction(self, "warmup_frac", "warmdown_frac", "final_lr_frac", "muon_momentum")
        if self.warmup_frac + self.warmdown_frac > 1:
            raise ConfigError("--optim.warmup-frac plus --optim.warmdown-frac must not exceed 1")


@dataclass
class TrainConfig:
    """Base pretraining (and, with other defaults, the chat stages)."""

    run: str = "default"
    """Run name: checkpoints and metrics go to NANOCHAT_HOME/runs/<run>."""
    tokenizer: str = "default"
    model: Annotated[ModelConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    total_batch_tokens: int = 524288
    """Tokens per optimizer step, summed over micro-batches and ranks."""
    micro_batch: int | Literal["auto"] = "auto"
    """Sequences per forward/backward on one device. `auto`: the largest power of two that divides the
    batch and whose estimated peak memory (nanochat/memory.py) fits the device with 15% headroom;
    an explicit one that would not fit is refused before training."""
    tokens_per_param: float = 20.0
    """Token budget as a multiple of the parameter count (Chinchilla ≈ 20); ignored if --max-steps."""
    max_steps: int = 0
    """Explicit number of optimizer steps; 0 derives it from --tokens-per-param."""
    data: str = "fineweb"
    """`offline`, `fineweb` (downloaded shards), or a folder of parquet / jsonl / txt files."""
    text_field: str = "text"
    skip_bad_data: bool = False
    """Warn and skip unreadable files or records instead of stopping."""
    eval_every: int = 250
    """Steps between validation bpb measurements and samples (0: only at the end)."""
    eval_tokens: int = 10_485_760
    """Validation tokens per bpb measurement (the whole split when it is smaller)."""
    save_every: int = 1000
    """Steps between checkpoints (0: only at the end)."""
    resume: bool = False
    """Continue from the run's latest checkpoint."""
    keep_last: int = 2
    seed: int = 42
    runtime: Device = field(default_factory=DeviceConfig)
    compile: bool = True
    """torch.compile the training step's model (`--no-compile`: eager, e.g. to debug)."""

    def __post_init__(self) -> None:
        check_positive(self, "total_batch_tokens", "tokens_per_param", "keep_last", "eval_tokens")
        check_positive(self, "max_steps", "eval_every", "save_every", allow_zero=True)
        if self.micro_batch != "auto":
            check_positive(self, "micro_batch")


def _preset(depth: int, **overrides) -> TrainConfig:
    return TrainConfig(model=ModelConfig(depth=depth), **overrides)


PRESETS: dict[str, TrainConfig] = {
    # Minutes on a 2-core CPU: a 4-layer, 128-wide model on short sequences, 4k vocabulary.
    "tiny": TrainConfig(
        run="tiny",
        tokenizer="tiny",
        data="offline",
        # Tuned at this shape for its 200 steps (benchmarks/README.md, Training recipe): a bigram table of
        # 16 rows per token (it can afford one, 8.4M lookup-only parameters), soft-cap 30, Muon at rate 0.04
        # with momentum 0.85 (short runs want little momentum). The GPU presets keep the rates, momentum
        # and cap tuned at d20 until they are measured there; the architecture rules are shared.
        model=ModelConfig(depth=4, aspect_ratio=32, head_dim=32, sequence_len=256, bigram_multiple=16,
                          logit_softcap=30.0),
        optim=OptimConfig(reference_batch_tokens=8192, matrix_lr=0.04, muon_momentum=0.85),
        total_batch_tokens=8192,
        micro_batch=16,
        max_steps=200,
        eval_every=50,  # four points on the report's bpb curve, ~4 s each
        eval_tokens=65536,
        save_every=100,
    ),
    "d12": _preset(12, run="d12"),
    "d20": _preset(20, run="d20"),
    "d26": _preset(26, run="d26"),
}


@dataclass
class ChatConfig:
    """Midtraining and SFT: continue a run's model on chat conversations."""

    run: str = "default"
    """The run whose base (midtrain) or mid (SFT) checkpoint is the starting point."""
    tasks: str = ""
    """Task mixture, e.g. `identity:2,wiki,spelling,arithmetic`; empty = the stage's offline default."""
    epochs: int = 1
    batch_size: int = 32
    """Sequences per optimizer step, over micro-batches and ranks."""
    micro_batch: int = 16
    """Sequences per forward/backward on one device."""
    max_steps: int = 0
    """0 = one pass over the mixture (× epochs)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmdown_frac=1.0))
    lr_scale: float = 1.0
    """Multiplies every learning rate of --optim (chat stages usually want smaller steps)."""
    eval_every: int = 0
    """Steps between validation losses (0: only at the end)."""
    save_every: int = 0
    keep_last: int = 1
    seed: int = 42
    runtime: Device = field(default_factory=DeviceConfig)
    compile: bool = True
    """torch.compile the training step's model (`--no-compile`: eager, e.g. to debug)."""
    resume: bool = False

    def __post_init__(self) -> None:
        check_positive(self, "epochs", "batch_size", "micro_batch", "keep_last", "lr_scale")
        check_positive(self, "max_steps", "eval_every", "save_every", allow_zero=True)


def _chat_presets(tiny_steps: int, tiny_compile: bool) -> dict[str, ChatConfig]:
    return {
        # A few minutes on 2 CPU cores: rows of the base model's 256 tokens, 16 per step.
        "tiny": ChatConfig(run="tiny", batch_size=16, micro_batch=16, max_steps=tiny_steps,
                           optim=OptimConfig(reference_batch_tokens=8192, warmdown_frac=1.0), lr_scale=0.5,
                           compile=tiny_compile),
        "d12": ChatConfig(run="d12"),
        "d20": ChatConfig(run="d20"),
        "d26": ChatConfig(run="d26", micro_batch=8),
    }


# Compiled where it is faster end to end on 2 CPU cores: midtraining's packed rows have one width, so
# one compile serves 250 steps; SFT's rows vary in width, and a dynamic-shape compile (~25 s) costs
# more than 150 short steps save (`nanochat sft --preset tiny`: 90 s eager, 100 s compiled).
MIDTRAIN_PRESETS = _chat_presets(tiny_steps=250, tiny_compile=True)
SFT_PRESETS = _chat_presets(tiny_steps=150, tiny_compile=False)


@dataclass
class RLConfig:
    """`nanochat rl`: reinforcement learning on verifiable rewards, continuing a run's SFT model."""

    run: str = "default"
    """The run whose SFT checkpoint is the starting point."""
    tasks: str = "gsm8k"
    """Comma-separated tasks with a reward (nanochat/tasks/rewards.py); prompts from their train splits."""
    prompts_per_step: int = 16
    """Prompts per optimizer step, over all ranks (each rank samples its share)."""
    samples: int = 16
    """Completions sampled per prompt: one group, whose mean reward is each completion's baseline."""
    temperature: float = 1.0
    top_k: int = 50
    max_tokens: int = 256
    """Budget of each completion; one that does not finish within it earns no reward."""
    micro_batch: int = 32
    """Completions per forward/backward on one device."""
    normalise_advantages: bool = False
    """Divide each group's advantages by its rewards' standard deviation (GRPO's choice)."""
    max_steps: int = 100
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_frac=0.0, warmdown_frac=1.0))
    lr_scale: float = 0.05
    """Multiplies every learning rate of --optim: RL moves a finished model, in small steps."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: only before the first step and at the end)."""
    eval_items: int = 200
    """Held-out prompts of each task evaluated for pass@1 and pass@k."""
    eval_samples: int = 4
    """k of pass@k: completions sampled per held-out prompt, with the training sampling settings."""
    save_every: int = 0
    keep_last: int = 1
    seed: int = 42
    runtime: Device = field(default_factory=DeviceConfig)
    compile: bool = False
    """torch.compile the policy-gradient step (its rows change width every step: dynamic shapes)."""
    resume: bool = False

    def __post_init__(self) -> None:
        check_positive(self, "prompts_per_step", "samples", "max_tokens", "micro_batch", "max_steps", "keep_last",
                       "lr_scale", "eval_items", "eval_samples")
        check_positive(self, "eval_every", "save_every", "temperature", "top_k", allow_zero=True)


RL_PRESETS: dict[str, RLConfig] = {
    # About 5 minutes on 2 CPU cores, inside the speedrun: the offline arithmetic task (exact answers,
    # the calculator in the loop), 32 questions × 4 completions per step. Temperature 0.6 and rate
    # scale 0.1 were the best of five tries; more questions a step did best at equal time (held-out
    # pass@1 +7.3 / +7.1 points on seeds 1 and 2, against +4.8 / +4.5 for 250 steps of 16 × 4;
    # benchmarks/rl.py, benchmarks/README.md).
    "tiny": RLConfig(run="tiny", tasks="arithmetic", prompts_per_step=32, samples=4, max_tokens=64, micro_batch=64,
                     max_steps=100, temperature=0.6, lr_scale=0.1, eval_items=200,
                     optim=OptimConfig(reference_batch_tokens=8192, warmup_frac=0.0, warmdown_frac=1.0)),
    "d12": RLConfig(run="d12"),
    "d20": RLConfig(run="d20"),
    "d26": RLConfig(run="d26", micro_batch=16),
}


@dataclass
class VerifyModelConfig:
    """`nanochat verify-model`: overfit one random batch to prove the model can learn."""

    model: Annotated[ModelConfig, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=64))
    vocab_size: int = 256
    batch_size: int = 4
    """Rows of the random batch; each starts with a different token, so at most --vocab-size."""
    steps: int = 100
    lr: float = 1e-2
    """AdamW learning rate (one for all parameters)."""
    target_loss: float = 0.01
    seed: int = 0
    runtime: Device = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "batch_size", "steps", "lr", "target_loss")
        if self.batch_size > self.vocab_size:
            raise ConfigError(f"--batch-size ({self.batch_size}) must not exceed --vocab-size ({self.vocab_size})")


# --------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class TokenizerTrainConfig:
    name: str = "default"
    """Written to NANOCHAT_HOME/tokenizers/<name>."""
    vocab_size: int = 65536
    inputs: tuple[str, ...] = ()
    """Text, jsonl or parquet files or folders; empty means the offline corpus."""
    max_chars: int = 2_000_000_000
    """Total characters read for training."""
    doc_cap: int = 10_000
    """Characters kept from each document (0 keeps all)."""

    def __post_init__(self) -> None:
        check_positive(self, "max_chars")
        check_positive(self, "doc_cap", allow_zero=True)
        if self.vocab_size < 256 + 9:
            raise ConfigError(f"--vocab-size must be at least 265 (256 bytes + 9 special tokens), "
                              f"got {self.vocab_size}")


@dataclass
class TokenizerEvalConfig:
    name: str = "default"
    inputs: tuple[str, ...] = ()
    """Held-out text to measure; empty means the offline corpus's validation split."""
    out: str = ""
    """Also write the table as JSON to this file (the speedrun writes runs/<run>/tokenizer.json
    for the report card)."""


TOKENIZER_PRESETS: dict[str, TokenizerTrainConfig] = {
    "tiny": TokenizerTrainConfig(name="tiny", vocab_size=4096),
    "d12": TokenizerTrainConfig(),
    "d20": TokenizerTrainConfig(),
    "d26": TokenizerTrainConfig(),
}


# --------------------------------------------------------------------------------------------
# Parsing


def parse_config(
    cls: type[C],
    argv: list[str],
    presets: dict[str, C] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> C:
    """Build a `cls` from `--preset NAME` (when presets are given) plus field overrides.

    Errors (unknown flag, wrong type, invalid value) print a message naming the field and
    exit with status 2, like any command-line tool.
    """
    default = cls()
    if presets:
        pre = argparse.ArgumentParser(add_help=False, prog=prog)
        pre.add_argument("--preset", choices=sorted(presets), default=None)
        known, argv = pre.parse_known_args(argv)
        if known.preset:
            default = copy.deepcopy(presets[known.preset])  # presets stay pristine
        if description is not None:
            description += f"\n\nPresets (--preset NAME): {', '.join(sorted(presets))}."
    return tyro.cli(cls, args=argv, default=default, prog=prog, description=description)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class DataDownloadConfig:
    """`nanochat data download`: fetch the first N parquet shards of a hub dataset."""

    num_shards: Annotated[int, tyro.conf.arg(aliases=("-n",))] = 8
    """How many shards (the last one is the validation split)."""
    repo_id: str = "karpathy/fineweb-edu-100b-shuffle"
    pattern: str = "shard_{index:05d}.parquet"
    """File name of shard `index` inside the repository."""
    name: str = "fineweb-edu"
    """Folder under NANOCHAT_HOME/data to write to (`--data fineweb` reads fineweb-edu)."""
    text_field: str = "text"
    workers: int = 8

    def __post_init__(self) -> None:
        check_positive(self, "num_shards", "workers")
        if self.num_shards < 2:
            raise ConfigError("--num-shards must be at least 2: the last shard is the validation split")
        if "{index" not in self.pattern:
            raise ConfigError(f"--pattern must contain {{index}} (e.g. shard_{{index:05d}}.parquet), "
                              f"got {self.pattern!r}")


CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


@dataclass
class CoreBundleConfig:
    """`nanochat data core-bundle`: download the CORE eval bundle (resumable, validated before use)."""

    url: str = CORE_BUNDLE_URL
    """Where the bundle zip is served (any zip holding core.yaml, eval_meta_data.csv, eval_data/)."""
    force: bool = False
    """Download again even when a bundle is already in place."""


@dataclass
class DataStatsConfig:
    """`nanochat data stats`: documents and characters per split of a source."""

    data: str = "offline"
    """`offline`, `fineweb`, or a folder of parquet / jsonl / txt files."""
    text_field: str = "text"


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalConfig:
    """`nanochat eval`: evaluate a run's models; results go to runs/<run>/eval/<stage>.json."""

    run: str = "default"
    stages: tuple[Literal["base", "mid", "sft", "rl"], ...] = ("base", "mid", "sft", "rl")
    """Model stages to evaluate (those the run does not have are skipped)."""
    chat_tasks: tuple[str, ...] = ("wiki_mc", "spelling", "arithmetic")
    """Chat evaluations for mid/sft/rl: wiki_mc spelling arithmetic (offline), arc_easy arc_challenge
    mmlu gsm8k humaneval (downloaded once)."""
    max_items: int = 200
    """Items per chat task (0: all)."""
    core_bundle: str = ""
    """CORE eval-bundle folder (core.yaml, eval_meta_data.csv, eval_data/); default
    NANOCHAT_HOME/data/eval_bundle, skipped when absent."""
    core_max_per_task: int = 0
    """Items per CORE task (0: all)."""
    bpb_tokens: int = 262144
    """Validation tokens for the base model's bits per byte."""
    pass_at_k: bool = True
    """For a run with an RL stage: the SFT and RL models' pass@1 and pass@k on RL's held-out questions,
    sampled with the settings RL trained and measured with (its saved config)."""
    runtime: Device = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        check_positive(self, "max_items", "core_max_per_task", allow_zero=True)
        check_positive(self, "bpb_tokens")


# --------------------------------------------------------------------------------------------
# Talking to a trained model


@dataclass
class ModelSource:
    """Which trained model a command loads (`nanochat chat`, `nanochat serve`)."""

    run: str = "tiny"
    """Run whose model to load (NANOCHAT_HOME/runs/<run>)."""
    stage: Literal["auto", "rl", "sft", "mid", "base"] = "auto"
    """Which of the run's models; `auto` takes the most finished one (rl, else sft, mid, base)."""
    checkpoint: str = ""
    """A checkpoint directory to load instead (overrides --run and --stage)."""
    runtime: Device = field(default_factory=DeviceConfig)


def valid_temperature(value: float) -> bool:
    return math.isfinite(value) and value >= 0


@dataclass
class ChatCliConfig:
    """`nanochat chat`."""

    source: Annotated[ModelSource, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelSource)
    prompt: Annotated[str, tyro.conf.arg(aliases=("-p",))] = ""
    """Answer this one message, print the reply and exit (`-` reads the message from stdin)."""
    system: str = ""
    """A system message to start every conversation with (merged into the first user turn)."""
    temperature: float = 0.6
    """Sampling temperature; 0 always takes the likeliest token. /temp changes it in the chat."""
    top_k: int = 50
    """Sample only among the k likeliest tokens (0: all of them)."""
    max_tokens: int = 512
    """Most tokens in one reply (and never more than the model's context leaves)."""
    seed: int | None = None
    """Make replies repeatable: reply n of the session is sampled with seed + n (None: a fresh
    random seed for every reply)."""

    def __post_init__(self) -> None:
        check_positive(self, "max_tokens")
        check_positive(self, "top_k", allow_zero=True)
        if not valid_temperature(self.temperature):
            raise ConfigError(f"--temperature must be a number ≥ 0 (got {self.temperature})")


@dataclass
class ServeConfig:
    """`nanochat serve`."""

    source: Annotated[ModelSource, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelSource)
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 lets other machines in (set an --api-key then)."""
    port: int = 8000
    workers: int = 1
    """Engine processes, each with its own copy of the model, on CPU or MPS (on CUDA: one per GPU)."""
    max_batch: int = 8
    """Replies a worker writes at once."""
    batching: Literal["continuous", "static"] = "continuous"
    """continuous: a request joins the running batch at its next step and leaves it when its reply ends;
    static: requests waiting together are written as one batch, which runs until its last reply ends."""
    prefill_chunk: int = 512
    """Continuous batching: most prompt tokens one decode step carries; a longer prompt is prefilled over
    several steps, so the replies being written are never held up for long."""
    threads: int = 0
    """Intra-op threads of each engine process; 0: one core is left to the HTTP server and the others are
    shared out between the engine processes (at least one each)."""
    pin_cores: bool = True
    """CPU engines on Linux: each engine process keeps to --threads cores of its own and the HTTP server to
    the others, so the server never takes a turn on an engine's core mid-step (when the cores suffice)."""
    max_queue: int = 64
    """Requests that may wait for a free worker; more get 503 (overloaded)."""
    api_key: str = ""
    """Require `Authorization: Bearer <key>` on /v1/* (else $NANOCHAT_API_KEY; neither: open)."""

    def __post_init__(self) -> None:
        check_positive(self, "workers", "max_batch", "prefill_chunk")
        check_positive(self, "max_queue", "port", "threads", allow_zero=True)
        if self.port > 65535:
            raise ConfigError(f"--port must be at most 65535 (got {self.port})")


@dataclass
class ExportConfig:
    """`nanochat export`: a trained model in the ecosystem's formats."""

    source: Annotated[ModelSource, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelSource)
    format: Literal["hf", "gguf"] = "hf"
    """hf: a Hugging Face transformers directory; gguf: one file for llama.cpp / Ollama."""
    arch: Literal["auto", "qwen3", "llama", "nanochat", "remote"] = "auto"
    """Target architecture: auto takes transformers' Qwen3, Llama or NanoChat where one computes this model
    exactly, else our own modeling file (remote code); naming one that is not exact is refused."""
    out: str = ""
    """Where to write (a new or empty directory for hf, a .gguf file for gguf); default
    NANOCHAT_HOME/exports/<run>-<stage>-<format>."""


# --------------------------------------------------------------------------------------------
# The whole pipeline, its report, the environment


@dataclass
class SpeedrunConfig:
    """`nanochat speedrun`."""

    preset: Literal["auto", "tiny", "d12", "d20", "d26"] = "auto"
    """`auto`: d20 when CUDA GPUs are present, else tiny."""
    run: str = ""
    """Run name (default: the preset's)."""
    data: str = ""
    """`offline`, `fineweb`, or a folder of text files (default: the preset's)."""
    shards: int = 240
    """FineWeb-Edu shards to download when the data is `fineweb` (d20 needs about 240)."""
    nproc: int = 0
    """Processes per node for the training stages; 0 = one per CUDA GPU (1 on CPU)."""


@dataclass
class ReportConfig:
    """`nanochat report`."""

    run: str = "default"
    gpu_hour_usd: float = 2.5
    """Price of one GPU-hour, for the cost estimate (CPU runs are not priced)."""


@dataclass
class InfoConfig:
    """`nanochat info`."""

    json: bool = False
    """Print machine-readable JSON instead of a table."""
