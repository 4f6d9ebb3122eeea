"""How much memory one rank needs to train a model: an estimate from the shape alone.

    params       fp32 master weights                                   4 B × parameters
    grads        fp32 gradients (they persist across micro-batches)    4 B × parameters
    optimizer    AdamW: two fp32 moments; Muon: one fp32 momentum       (8 B / 4 B × its parameters) / W
                 (sharded over the W ranks: nanochat.optim)
    casts        bf16 copies of the matmul weights autocast makes       2 B × matmul parameters
    activations  what autograd saves for the backward pass, per token and layer (below)
    loss         the head's logits while the loss and its gradient are computed

Activations, counted from what this package's GPT saves in eager mode (checked exactly against
autograd's saved tensors on the CPU in tests/test_memory.py), per token and block, with C =
n_embd (= n_head · head_dim), K = n_kv_head · head_dim, F = the MLP's hidden size, H/Hk heads:

    fp32   4 · (8·C + 3·K + 4·F + 2·H + Hk + 2)  bytes
    bf16   28·C + 8·K + 8·F + 8·H + 4·Hk + 8    bytes   (norms run in fp32 under autocast; each of
           q/k/v and gate/up casts its normed input to bf16 on its own)

(SwiGLU's 4·F hidden tensors are 2·F for ReLU²; the x0 mix-in adds 4·C per layer)

Compiled (torch.compile's default partitioner, which chooses what to save and what to recompute
in the backward pass; checked exactly against the tensors its backward graph takes, in
tests/test_memory.py), a block saves less:

    fp32   4 · (8·C + 3·K + 3·F + 2·H + Hk + 2)  bytes   (one SwiGLU hidden tensor recomputed)
    bf16   20·C + 6·K + 6·F + 8·H + 4·Hk + 8    bytes   (the normed inputs' casts shared; the
           residual's fp32 copies are recomputed from bf16 ones)

(ReLU²'s 2·F tensors stay). The embedding, value embeddings and loss are counted as in eager mode.

plus per token the embedding's and final norm's inputs, and per value-embedding layer its lookup.
The plain loss holds four fp32 N×V tensors at its peak (logits, soft-capped, log-softmax, their
gradient); the chunked loss (`gpt.head_loss`) holds only the gradients of h and W and one chunk.

Against the measured peak of whole training steps on the CPU (torch.profiler's memory timeline:
every byte from building the model through two optimizer steps), the estimate is 1% under to 19%
over on the test shapes (tests/test_memory.py), mostly because the loss's and the activations'
peaks do not quite coincide (at these small shapes Muon's step temporaries can set the peak).
Not counted: the allocator's fragmentation, the CUDA context and the compiled kernels' own
scratch buffers, which `choose_micro_batch` leaves HEADROOM for; and the optimizer step's buffers
(the sharded step's stacked matrices of two shapes), which live after the backward pass has
freed the activations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from nanochat.config import ConfigError, ModelConfig, TrainConfig
from nanochat.gpt import LOSS_CHUNK_ELEMENTS, SMEAR_CHANNELS, VE_GATE_CHANNELS, padded_vocab

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of peak training memory on one rank, by kind."""

    params: int
    grads: int
    optimizer: int
    casts: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def table(self) -> str:
        """One line per kind, in GiB, and the total."""
        rows = [f"  {f.name:<12} {getattr(self, f.name) / GIB:8.2f} GiB" for f in fields(self)]
        return "\n".join([*rows, f"  {'total':<12} {self.total / GIB:8.2f} GiB"])


def parameter_counts(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Parameters by what the optimizer does with them: `muon` (the blocks' matrices), `adamw`
    (embeddings, head, lookup tables, vectors), and `matmul` (what autocast casts: blocks + head)."""
    C, K, F, V = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden, padded_vocab(vocab_size)
    per_block = C * C + 2 * C * K + C * C + (3 if cfg.mlp == "swiglu" else 2) * C * F
    ve_layers = sum(cfg.has_value_embedding(i) for i in range(cfg.depth))
    gates = ve_layers * VE_GATE_CHANNELS * cfg.kv_heads if cfg.ve_gate else 0  # matrices in blocks: Muon's
    muon = cfg.depth * per_block + gates
    head = 0 if cfg.tie_embeddings else V * C
    tables = V * C + ve_layers * V * K + cfg.bigram_multiple * V * C
    vectors = (SMEAR_CHANNELS + 1 if cfg.smear else 0) + (2 * cfg.depth if cfg.x0_skip else 0)
    return {"muon": muon, "adamw": head + tables + vectors, "matmul": cfg.depth * per_block + gates + V * C}


def activation_bytes_per_token(cfg: ModelConfig, bf16: bool, compiled: bool = False) -> int:
    """Bytes autograd saves per token for the whole model, the loss excluded (see the module docstring)."""
    C, K, F = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden
    H, Hk = cfg.n_head, cfg.kv_heads
    # SwiGLU saves h, gate, silu(gate) and their product (compiled: one is recomputed); ReLU² only
    # relu(h) and its square.
    F_saved = 2 * F if cfg.mlp == "relu2" else (3 if compiled else 4) * F
    # Attention saves q and its output (C each) but K and V unrepeated (K each: SDPA's enable_gqa).
    if bf16 and compiled:
        per_layer = 20 * C + 6 * K + 2 * F_saved + 8 * H + 4 * Hk + 8
    elif bf16:
        per_layer = 28 * C + 8 * K + 2 * F_saved + 8 * H + 4 * Hk + 8
    else:
        per_layer = 4 * (8 * C + 3 * K + F_saved + 2 * H + Hk + 2)
    if cfg.x0_skip:  # each block's input mixed with x0: the residual saved once more per layer
        per_layer += 4 * C
    n_ve = sum(cfg.has_value_embedding(i) for i in range(cfg.depth))
    ve = n_ve * K * (2 if bf16 else 4)  # the value embedding added to v
    if cfg.ve_gate:  # the gate's input channels and its sigmoid, per head
        ve += n_ve * 4 * (VE_GATE_CHANNELS + 2 * Hk)
    # The embedding's norm (input + rstd), the smear/bigram mixing (about three C-vectors), the
    # final norm (input + rstd) and its normed output, cast for the head under autocast.
    outer = 4 * (C + 1) + (12 * C if cfg.smear or cfg.bigram_multiple else 0) + 4 * (C + 1) + (2 if bf16 else 4) * C
    return cfg.depth * per_layer + ve + outer + 8  # + the token ids


def loss_bytes(cfg: ModelConfig, vocab_size: int, tokens: int) -> int:
    """Peak bytes of the head's loss for `tokens` rows: four fp32 N×V tensors on the plain path;
    the gradients of h and W plus four tensors of one chunk on the chunked path (`gpt.head_loss`)."""
    limit = LOSS_CHUNK_ELEMENTS
    elements = tokens * vocab_size
    if elements <= limit:
        return 16 * elements
    return 4 * tokens * cfg.n_embd + 4 * vocab_size * cfg.n_embd + 16 * limit


def estimate(cfg: ModelConfig, vocab_size: int, micro_batch: int, bf16: bool, world_size: int = 1,
             seq_len: int | None = None, compiled: bool = False) -> MemoryEstimate:
    """Peak training memory of one rank for micro-batches of `micro_batch` rows (see the module docstring)."""
    counts = parameter_counts(cfg, vocab_size)
    total = counts["muon"] + counts["adamw"]
    tokens = micro_batch * (seq_len or cfg.sequence_len)
    return MemoryEstimate(
        params=4 * total,
        grads=4 * total,
        optimizer=-(-(4 * counts["muon"] + 8 * counts["adamw"]) // world_size),
        casts=2 * counts["matmul"] if bf16 else 0,
        activations=tokens * activation_bytes_per_token(cfg, bf16, compiled),
        loss=loss_bytes(cfg, vocab_size, tokens),
    )


HEADROOM = 0.15  # of the device's memory, left for the allocator's fragmentation, the CUDA context, buffers


def choose_micro_batch(cfg: TrainConfig, vocab_size: int, world_size: int, bf16: bool,
                       available: int | None, where: str = "the device") -> int:
    """`cfg.micro_batch` made concrete. `auto`: the largest power of two that divides the batch and
    whose estimate fits (1 − HEADROOM) × `available` bytes (with `available` unknown, the largest
    dividing power of two up to 32). An explicit micro-batch that would not fit is refused, with
    the estimate and the micro-batch that would, before anything is trained."""
    T = cfg.model.sequence_len
    per_rank_rows = cfg.total_batch_tokens // (T * world_size)

    def divides(m: int) -> bool:
        return cfg.total_batch_tokens % (m * T * world_size) == 0

    def fits(m: int) -> bool:
        if available is None:
            return True
        need = estimate(cfg.model, vocab_size, m, bf16, world_size, compiled=cfg.compile)
        return need.total <= (1 - HEADROOM) * available

    candidates = [m for m in (2**i for i in range(11)) if m <= max(per_rank_rows, 1) and divides(m)]
    if cfg.micro_batch == "auto" and not candidates:
        raise ConfigError(f"--micro-batch auto: --total-batch-tokens {cfg.total_batch_tokens} is not a multiple of "
                          f"sequence length × ranks = {T} × {world_size}; change --total-batch-tokens")
    fitting = [m for m in candidates if fits(m) and (available is not None or m <= 32)]
    if cfg.micro_batch != "auto":
        if fits(cfg.micro_batch):
            return cfg.micro_batch
        need = estimate(cfg.model, vocab_size, cfg.micro_batch, bf16, world_size, compiled=cfg.compile)
        fix = (f"use --micro-batch {fitting[-1]} (the largest that fits) or --micro-batch auto" if fitting else
               "not even one row per micro-batch fits: use more devices or a smaller model")
        raise ConfigError(f"--micro-batch {cfg.micro_batch} needs about {need.total / GIB:.1f} GiB on each rank, more "
                          f"than {(1 - HEADROOM) * available / GIB:.1f} GiB ({1 - HEADROOM:.0%} of the "
                          f"{available / GIB:.1f} GiB free on {where}); {fix}. The estimate "
                          f"({_mode(cfg)}):\n{need.table()}")
    if not fitting:
        one = estimate(cfg.model, vocab_size, 1, bf16, world_size, compiled=cfg.compile)
        raise ConfigError(f"--micro-batch auto: not even one row fits the {(available or 0) / GIB:.1f} GiB free on "
                          f"{where} (one row needs about {one.total / GIB:.1f} GiB); use more devices or a smaller "
                          f"model. The estimate for one row:\n{one.table()}")
    return fitting[-1]


def _mode(cfg: TrainConfig) -> str:
    return "compiled" if cfg.compile else "eager: --compile needs less"


def out_of_memory_message(cfg: TrainConfig, vocab_size: int, world_size: int, bf16: bool, where: str) -> str:
    """What a training run that ran out of device memory says: the estimate and the fix."""
    need = estimate(cfg.model, vocab_size, cfg.micro_batch, bf16, world_size, compiled=cfg.compile)
    smaller = f"--micro-batch {cfg.micro_batch // 2}" if cfg.micro_batch > 1 else "more devices or a smaller model"
    return (f"out of memory on {where} at --micro-batch {cfg.micro_batch} (estimated peak {need.total / GIB:.1f} GiB "
            f"per rank; the estimate is below). Checkpoints already written are kept; start again with {smaller} "
            f"(the gradient accumulation grows to keep the batch) or --micro-batch auto, adding --resume to continue "
            f"from the last checkpoint:\n{need.table()}")
