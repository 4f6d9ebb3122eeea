"""The GPT: a Llama-style decoder-only transformer, readable top to bottom.

    tokens ─► embedding (+ smear, bigram) ─► RMSNorm ─► depth × Block ─► RMSNorm ─► head ─► (soft-cap) ─► logits
    Block:  x + Attention(RMSNorm(x))  then  x + MLP(RMSNorm(x))            (pre-norm residual)

- Built from one config: `GPT(ModelConfig, vocab_size)`; the shape's rules and checks live in
  `nanochat.config.ModelConfig`, the vocabulary comes from the tokenizer.
- RMSNorm (Zhang & Sennrich 2019) without a learnable gain: F.rms_norm only. A gain per channel
  adds little once every matrix around it is trained, and without it every parameter is a matrix,
  which keeps the optimizer split (Muon for matrices, AdamW for embedding/head) simple.
- Rotary position embeddings (RoPE, Su et al. 2021) on queries and keys; no position embedding.
- Causal attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on
  CUDA), with grouped-query attention (Ainslie et al. 2023) when n_kv_head < n_head, and optional
  QK-norm (RMSNorm of each query and key head) that keeps attention logits bounded in bf16.
- SwiGLU MLP (Shazeer 2020) by default, ReLU² (So et al. 2021) as an option; no biases anywhere.
- Output projections of every block start at zero, so each block starts as the identity.
- The token's input (from the modded-nanogpt speedrun records; each measured in benchmarks/recipe.py):
  a bigram hash embedding (a learned vector per hashed (previous, current) token pair: bigram
  statistics straight from a lookup instead of from the first layers; −4.2% bpb on the tiny shape),
  the smear (a gated share of the previous token's embedding; −0.4%), and value embeddings on
  every other layer, added to the attention values (token identity for the deep layers; −2.9%).
  Optional: a gate on the value embeddings, an x0 mix-in of the token embedding before each block
  with learned per-layer scalars, and a different attention scale (all measured neutral here).
- The loss: head, soft-cap (logits bounded to ±cap by tanh) and cross-entropy in fp32. Where the
  logits of a micro-batch would be large (over 2^28 elements, e.g. 32 × 2048 × 65,536 at d20:
  17 GB in fp32), they are made a chunk of rows at a time and never held whole (`head_loss`).
- A KV cache for generation: prefill a batch of prompts, then decode one token at a time. The
  cache owns where the next tokens sit: their rotary positions and the attention mask they need,
  and each row's last token (what the smear and the bigram of the next token read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.config import ModelConfig
from nanochat.errors import NanochatError

ROPE_HEADROOM = 4  # rotary tables cover 4 × sequence_len positions, so generation can run past it
VE_GATE_CHANNELS = 32  # the value-embedding gate reads this many channels of the block input
SMEAR_CHANNELS = 16  # the smear gate reads this many channels of the token embedding
BIGRAM_MULTIPLIER = 1_000_003  # prime: (previous·this + current) mod buckets spreads the pairs


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it was in, also on an exception.
    A model already wholly in eval mode is left alone: switching modes walks every submodule, which
    cost a decode step of the tiny model 13% on the CPU. `modules`: model.modules(), listed once by
    a caller that enters this every step (engine.ContinuousBatch): even the walk that finds the
    model in eval mode already was 70 µs of a 4 ms step."""
    if not any(m.training for m in (model.modules() if modules is None else modules)):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


# Logits above this many elements (512 MiB in fp32; the loss then peaks near 2 GiB) are made a chunk
# of rows of this size at a time: d20's 16 × 2048 rows × 65,536 (8.6 GB) in 16 chunks of 2,048 rows,
# each still a full-size matmul for a GPU, and few enough for torch.compile to unroll the loop.
LOSS_CHUNK_ELEMENTS = 2**27


def _capped_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float) -> torch.Tensor:
    """fp32 logits of hidden rows `h` (N, C) against head rows `weight` (V, C), soft-capped to ±softcap."""
    logits = F.linear(h, weight).float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of softcap(h·Wᵀ) against targets (-1: no loss), `rows` rows at a time.

    Each chunk's logits live only while that chunk is processed: the forward pass computes the
    chunk's loss and, at once, its gradients with respect to h and W (the logits' gradient is
    softmax − one-hot, times the soft-cap's tanh derivative), and keeps only those two gradients
    (N×C and V×C), never the N×V logits that the plain path saves for its backward. The backward
    pass scales them by the incoming gradient. The matmuls run in h's dtype (bf16 under autocast,
    as the plain path's), the softmax and the loss in fp32. (The fused linear-cross-entropy
    kernels of Liger and Apple's Cut Cross-Entropy use the same identity.)
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                rows: int, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), rows):  # under autocast each matmul casts, as on the plain path
            hc, tc = h[start:start + rows], targets[start:start + rows]
            capped = _capped_logits(hc, weight, softcap)
            keep, safe = tc != -1, tc.clamp(min=0)
            if token_weights is None:
                total += F.cross_entropy(capped, tc, ignore_index=-1, reduction="sum")
            else:  # each row's loss (and so its gradient) scaled by its weight
                wc = token_weights[start:start + rows]
                total += (F.cross_entropy(capped, tc, ignore_index=-1, reduction="none") * wc).sum()
                keep = keep * wc
            g = torch.softmax(capped, dim=-1)  # d loss / d capped: softmax − one-hot on counted rows
            g.scatter_add_(1, safe[:, None], -torch.ones_like(g[:, :1]))
            g *= keep[:, None]
            if softcap:  # d capped / d raw = 1 − tanh² = 1 − (capped / cap)²
                g *= 1 - (capped / softcap).square()
            g = g.to(h.dtype)
            grad_h[start:start + rows] = g @ weight
            grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out, None, None, None, None


def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
              max_elements: int | None = None, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of the soft-capped head logits of hidden rows `h` (N, C) against
    `targets` (N,; -1 = no loss), W = `weight` (V, C) the head rows of the real vocabulary; with
    `token_weights` (N,), each row's cross-entropy times its weight (reinforcement learning's
    advantages).

    When N×V logits fit in `max_elements` (the tiny preset: 4,096 × 4,096), the plain expression,
    which torch.compile fuses; above it, `rows` at a time so that no N×V tensor is ever held: with
    gradients through `_ChunkedHeadLoss`, without (evaluation) chunk by chunk under no_grad.
    `max_elements` defaults to LOSS_CHUNK_ELEMENTS."""
    n, vocab = h.size(0), weight.size(0)
    max_elements = max_elements or LOSS_CHUNK_ELEMENTS
    if n * vocab <= max_elements:
        logits = _capped_logits(h, weight, softcap)
        if token_weights is None:
            return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
        return (F.cross_entropy(logits, targets, ignore_index=-1, reduction="none") * token_weights).sum()
    rows = max(1, max_elements // vocab)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedHeadLoss.apply(h, weight, targets, softcap, rows, token_weights)
    if token_weights is None:
        return sum(F.cross_entropy(_capped_logits(h[i:i + rows], weight, softcap), targets[i:i + rows],
                                   ignore_index=-1, reduction="sum") for i in range(0, n, rows))
    return sum((F.cross_entropy(_capped_logits(h[i:i + rows], weight, softcap), targets[i:i + rows],
                                ignore_index=-1, reduction="none") * token_weights[i:i + rows]).sum()
               for i in range(0, n, rows))


def padded_vocab(vocab_size: int) -> int:
    """Rows of the embedding and head: the vocabulary rounded up to a multiple of 64, which the
    matmul kernels prefer. The extra rows are never a target and are sliced off the logits."""
    return -(-vocab_size // 64) * 64


def rotary_tables(n_pos: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle position·θ_i, θ_i = theta^(-2i/head_dim), shape (n_pos, head_dim/2).
    Computed in float64 (angles reach thousands of radians) and stored in float32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + d/2]) of a head by its angle: as a complex number
    x_i + j·x_{i+d/2} multiplied by e^{j·angle}. x: (B, H, T, d); cos, sin broadcast to (B, H, T, d/2).
    Done in float32 so that bf16 activations are rotated without extra rounding."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
              scale: float | None) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, d) over k, v (B, kv_heads, L, d). is_causal
    without a mask lets SDPA pick its flash kernels (training, a cache's first chunk). GQA: each
    group of query heads shares one key/value head, which SDPA reads in place (enable_gqa)
    instead of a repeated copy of K and V."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.size(1) != q.size(1))


class KVCache:
    """Keys and values of every layer while a batch of sequences is generated.

    k and v are preallocated, (depth, B, kv_heads, max_len, head_dim). Prompts of different
    lengths are right-aligned: row b is left-padded with pad[b] filler tokens so that every row
    ends at the same slot and all rows then decode in lockstep (one new slot per step for all).
    Attention never looks at a row's pad slots, and positions count from each row's first real
    token, so each row's logits are exactly those of its prompt run alone.

    What a forward pass asks of a cache (SlotCache answers the same three): `positions` of its T
    new tokens (first, once), each token's `previous` token (for the smear and bigram inputs), and
    each layer's `attend`, which stores the layer's new keys and values and attends over the row's
    own. After the last layer, `pos` moves past the new tokens.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 pad: torch.Tensor | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.padded = pad is not None and bool(pad.any())  # no pad slots: decoding needs no mask at all
        self.pos = 0  # slots filled so far, the same for every row
        self.max_len = max_len
        self.last_token = torch.zeros(batch_size, dtype=torch.long, device=device)  # for smear / bigram inputs

    def positions_and_mask(self, T: int) -> tuple[slice | torch.Tensor, torch.Tensor | None, bool]:
        """Where the next T tokens of every row go: (positions, attn_mask, is_causal).

        positions index the rotary tables: a slice when every row's positions are its slots,
        else (B, 1, T) per-row positions (broadcast over heads). attn_mask is None or a boolean
        (B, 1, T, pos + T) over the slots filled so far; is_causal asks SDPA for its own causal mask.
        """
        if self.pos + T > self.max_len:
            raise NanochatError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        if not self.padded and (T == 1 or self.pos == 0):
            # The common case, cheap: no pad slots, so positions are slots, and the new tokens are either
            # one (it sees every slot so far: no mask) or the first chunk (plain causal attention).
            return slice(self.pos, self.pos + T), None, T > 1
        slot = self.pos + torch.arange(T, device=self.pad.device)  # (T,) cache slots of the new tokens
        pad = self.pad.view(-1, 1, 1)
        positions = (slot - pad[:, 0]).clamp(min=0).unsqueeze(1)  # (B, 1, T) position in each row's own text
        key = torch.arange(self.pos + T, device=self.pad.device)
        # Causal, and never a pad slot; a pad slot sees itself so that no softmax row is empty (NaN).
        mask = (key <= slot[:, None]) & ((key >= pad) | (key == slot[:, None]))  # (B, T, pos + T)
        return positions, mask.unsqueeze(1), False

    def positions(self, T: int) -> slice | torch.Tensor:
        """The rotary positions of the next T tokens of every row (see positions_and_mask, whose
        mask the layers' `attend` then uses)."""
        self._positions, self._mask, self._is_causal = self.positions_and_mask(T)
        return self._positions

    def previous(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prev, has_prev), both (B, T): the token before each of `idx` (the row's last cached one
        for the first) and whether there is one (a row's first real token has none)."""
        prev = torch.cat((self.last_token[:, None], idx[:, :-1]), dim=1)
        positions = self._positions
        if isinstance(positions, slice):
            has_prev = (torch.arange(positions.start, positions.stop, device=idx.device) > 0).expand_as(idx)
        else:
            has_prev = positions[:, 0] > 0
        self.last_token = idx[:, -1]
        return prev, has_prev

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, n_kv_head, T, head_dim) of one layer at slots pos..pos+T-1 and
        return all of that layer's keys and values so far. After the last layer, pos moves past them."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        if layer == self.k.size(0) - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """One layer's attention output (B, H, T, d) for queries q over the cached keys and the new
        k, v (B, kv_heads, T, d), which are stored."""
        k, v = self.insert(layer, k, v)
        return attention(q, k, v, self._mask, self._is_causal, scale)


@dataclass(frozen=True)
class _Pass:
    """What one forward pass over a SlotCache carries, as SlotCache.schedule laid it out."""

    positions: torch.Tensor  # (N,) each packed token's position in its row
    slot: torch.Tensor  # (N,) each token's row
    rows: torch.Tensor  # (R,) the rows fed, in packed order
    first: torch.Tensor | None  # (N,) whether a token is its row's first in the pass (None: one token a row)
    last: torch.Tensor | None  # (R,) where each row's last token is (None: one token a row)
    column: int  # the cache column where every row fed puts its last token
    singles: int  # the first `singles` tokens are rows fed one token each
    single_rows: torch.Tensor | None  # their rows (None: every row, in order)
    window: int  # the first column any of them sees
    single_mask: torch.Tensor | None  # (slots, 1, 1, column + 1 - window): the columns each row's one token sees
    chunks: tuple[tuple[int, int, int, int, torch.Tensor | None], ...]  # (row, offset, count, start, mask)


class SlotCache:
    """Keys and values for continuous batching: `slots` rows, each holding one sequence with its
    own length, so sequences join and leave between forward passes.

    Before each pass, `schedule` says what it carries: any number of new tokens for any rows (a
    decode step's one token per running row, and the prompt of a sequence just admitted, whole or
    a chunk of it), packed into one row of ids (1, N), the one-token rows first. Each token goes
    at its row's next position and attends to its own row's tokens only: the one-token rows in
    one batched attention, each longer chunk on its own, causally. So every row's logits are those
    of its sequence run alone, and a prompt is prefilled in the same pass that decodes the others.
    `copy` hands a prefilled sequence to another row (several completions of one prompt). Lengths
    live on the host, where the scheduler knows them: a pass needs no device sync. Same three
    questions as KVCache towards the model (positions, previous, attend).

    The rows share their columns, as the left-padded KVCache's do: every row fed in a pass puts its
    last new token in the same column, one further each pass, and holds its sequence in the columns
    just before (a prompt lands right-aligned there). So a decode step stores each layer's keys with
    one strided copy, where columns of each row's own took a scatter at about twice the cost (tiny
    model, CPU). Where the columns lie changes nothing a row computes but rounding: positions count
    from its own first token (rotary), and the mask hides every column but its own. When the
    columns run out (or a prompt needs more room before the current one), the rows move back
    towards the start of the cache, which doubles then while it has fewer than twice the columns
    the longest row needs (up to 2·max_len): a restart at most every so many passes. The
    one-token rows attend over every row's columns as they lie (a view, never a copy), rows not
    among them asking a dummy query: gathering the rows' keys and values instead cost 4× as much
    for 7 rows of 8.
    """

    first_columns = 256  # the cache's width to begin with (it grows as longer sequences need)

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len, self.most_columns = max_len, 2 * max_len
        columns = min(self.most_columns, self.first_columns)
        self._allocate(torch.zeros((n_layer, slots, n_kv_head, columns, head_dim), device=device, dtype=dtype))
        self.lengths = [0] * slots  # tokens each row holds
        self.ends = [0] * slots  # the column of each row's last token (when it holds any)
        self.column = -1  # the column the last pass wrote
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # each row's last token
        self.device = self.k.device
        self._key = torch.arange(self.most_columns, device=self.device)  # columns, for the masks
        self.plan: _Pass | None = None

    def _allocate(self, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Take k and v (zeros like k if None) as the cache, and each layer's views of them."""
        self.k, self.v = k, torch.zeros_like(k) if v is None else v
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # per pass, 4 µs less a layer

    def reset(self, slot: int) -> None:
        """Empty a row, for a new sequence."""
        self.lengths[slot] = 0

    def copy(self, src: int, dst: int) -> None:
        """Row `dst` takes a copy of the sequence in row `src`, in the same columns."""
        self._place(src, dst, self.ends[src])
        self.tokens[dst] = self.tokens[src]

    def _move(self, row: int, end: int) -> None:
        """Move a row's sequence to end at column `end`."""
        self._place(row, row, end)

    def _place(self, src: int, dst: int, end: int) -> None:
        """Row `dst` holds row `src`'s sequence, ending at column `end`."""
        n, old = self.lengths[src], self.ends[src]
        before, after = slice(old - n + 1, old + 1), slice(end - n + 1, end + 1)
        for cache in (self.k, self.v):  # within one row the two ranges may overlap: copy it out first
            cache[:, dst, :, after] = cache[:, src, :, before].clone() if src == dst else cache[:, src, :, before]
        self.lengths[dst], self.ends[dst] = n, end

    def _restart(self, feeds: Sequence[tuple[int, Sequence[int]]]) -> int:
        """The column for a pass when the next one is past the cache's end, or too close to its
        start for a row's sequence and new tokens: the least that has room for every row's, the
        cache doubling while it has fewer than twice as many columns (so that it restarts at most
        every so many passes). The rows fed then move there (`schedule`); the others, when they are
        fed next."""
        column = max((self.lengths[row] + len(tokens) - 1 for row, tokens in feeds), default=0)
        columns = self.k.size(3)
        while columns < min(2 * (column + 1), self.most_columns):
            columns = min(2 * columns, self.most_columns)
        if columns > self.k.size(3):
            k = self.k.new_zeros((*self.k.shape[:3], columns, self.k.size(4)))
            v = torch.zeros_like(k)
            k[:, :, :, :self.k.size(3)], v[:, :, :, :self.v.size(3)] = self.k, self.v
            self._allocate(k, v)
        return column

    def schedule(self, feeds: Sequence[tuple[int, Sequence[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Lay out the next forward pass: `feeds` are (row, its new tokens), at most one per row.
        Returns the packed ids (1, N) to run and, for each feed in the order given, the index of
        its last token in them (where its logits will be). The rows' lengths move on now."""
        if len({row for row, _ in feeds}) != len(feeds):
            raise ValueError("a row is fed at most once per pass")
        for row, tokens in feeds:
            if not tokens:
                raise ValueError(f"row {row} is fed no tokens")
            if self.lengths[row] + len(tokens) > self.max_len:
                raise NanochatError(f"KV cache full: row {row} holds {self.lengths[row]} tokens, + {len(tokens)} > "
                                    f"max_len {self.max_len}")
        column = self.column + 1
        if column >= self.k.size(3) or any(self.lengths[row] + len(tokens) > column + 1 for row, tokens in feeds):
            column = self._restart(feeds)
        for row, tokens in feeds:  # a row that skipped passes: its sequence moves up to its new tokens
            if self.lengths[row] and self.ends[row] != column - len(tokens):
                self._move(row, column - len(tokens))
        order = sorted(range(len(feeds)), key=lambda i: (len(feeds[i][1]) > 1, feeds[i][0]))
        ids, slot, positions, last = [], [], [], [0] * len(feeds)
        singles, chunks = 0, []
        for i in order:
            row, tokens = feeds[i]
            held, offset = self.lengths[row], len(ids)
            ids += tokens
            slot += [row] * len(tokens)
            positions += range(held, held + len(tokens))
            last[i] = len(ids) - 1
            if len(tokens) == 1:
                singles += 1
            else:
                chunks.append((row, offset, len(tokens), held))
            self.lengths[row], self.ends[row] = held + len(tokens), column
        self.column = column
        dev, slots = self.device, len(self.lengths)
        rows = [feeds[i][0] for i in order]
        every = rows[:singles] == list(range(slots))
        starts = []  # the first column each row's one token sees: its own, or the current one (a dummy)
        if singles:
            starts = [column - self.lengths[row] + 1 for row in rows[:singles]]
            if not every:
                first_seen = dict(zip(rows[:singles], starts, strict=True))
                starts = [first_seen.get(row, column) for row in range(slots)]
        n, r = len(ids), len(rows)  # one host-to-device copy for all four
        packed = torch.tensor(ids + rows + positions + starts, device=dev)
        ids_t, rows_t, positions_t, starts_t = packed[:n], packed[n:n + r], packed[n + r:2 * n + r], packed[2 * n + r:]
        window, single_mask = column, None
        if singles:
            window = min(starts)
            single_mask = (self._key[window:column + 1] >= starts_t[:, None]).view(slots, 1, 1, -1)
        chunk_plans = []
        for row, offset, count, held in chunks:  # a chunk after earlier ones sees them all, and itself causally
            mask = None if held == 0 else self._key[:held + count] <= self._key[held:held + count, None]
            chunk_plans.append((row, offset, count, column - held - count + 1, mask))
        if chunks:
            first = [False] * len(ids)
            for j in [0, *(i + 1 for i in sorted(last)[:-1])]:  # each row's first: after the row before
                first[j] = True
            slot_t, first, last_t = (torch.tensor(slot, device=dev), torch.tensor(first, device=dev),
                                     torch.tensor(sorted(last), device=dev))
        else:  # one token a row: each token is its row's first and last
            slot_t, first, last_t = rows_t, None, None
        self.plan = _Pass(
            positions=positions_t, slot=slot_t, rows=rows_t, first=first, last=last_t, column=column,
            singles=singles, single_rows=None if every else rows_t[:singles], window=window,
            single_mask=single_mask, chunks=tuple(chunk_plans))
        return ids_t.view(1, n), last

    def positions(self, T: int) -> torch.Tensor:
        """Rotary positions (1, 1, N) of the scheduled pass's tokens, each in its own row."""
        if self.plan is None or T != self.plan.positions.numel():
            raise NanochatError("a SlotCache pass runs the ids its `schedule` returned")
        return self.plan.positions.view(1, 1, -1)

    def previous(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prev, has_prev), both (1, N): the token before each packed token (its row's last cached
        one for the row's first in this pass) and whether there is one."""
        plan = self.plan
        if plan.first is None:  # one token a row: the one before is the row's last
            prev = self.tokens[plan.rows][None]
            self.tokens[plan.rows] = idx[0]
        else:
            before = torch.cat((idx[:, :1], idx[:, :-1]), dim=1)
            prev = torch.where(plan.first, self.tokens[plan.slot], before)
            self.tokens[plan.rows] = idx[0, plan.last]
        return prev, (plan.positions > 0).view(1, -1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """Store the pass's new keys/values (1, kv_heads, N, d) in their rows' columns, and return
        its attention output (1, H, N, d), each token over its own row."""
        plan, c = self.plan, self.plan.column
        kc, vc = self._layers[layer]  # (slots, kv_heads, columns, d)
        k, v = k[0], v[0]  # (kv_heads, N, d)
        k, v = k if k.dtype == kc.dtype else k.to(kc.dtype), v if v.dtype == vc.dtype else v.to(vc.dtype)
        keys, values = kc.narrow(2, plan.window, c + 1 - plan.window), vc.narrow(2, plan.window, c + 1 - plan.window)
        if plan.single_rows is None and plan.singles:  # a decode step of every row: one column, no chunks
            kc.select(2, c).copy_(k.transpose(0, 1))
            vc.select(2, c).copy_(v.transpose(0, 1))
            y = attention(q.permute(2, 1, 0, 3), keys, values, plan.single_mask, False, scale)
            return y.permute(2, 1, 0, 3)  # (slots, H, 1, d) queries, each over its row, back to (1, H, N, d)
        out, n = [], plan.singles
        if n:  # (slots, H, 1, d) queries, each over its own row's columns; rows not fed one token ask a dummy
            kc.select(2, c).index_copy_(0, plan.single_rows, k[:, :n].transpose(0, 1))
            vc.select(2, c).index_copy_(0, plan.single_rows, v[:, :n].transpose(0, 1))
            q1 = q[0, :, :n].transpose(0, 1).unsqueeze(2)
            q1 = q1.new_zeros(kc.size(0), *q1.shape[1:]).index_copy_(0, plan.single_rows, q1)
            y = attention(q1, keys, values, plan.single_mask, False, scale).index_select(0, plan.single_rows)
            out.append(y[:, :, 0].transpose(0, 1))
        for row, offset, count, start, mask in plan.chunks:  # the chunk goes in the columns up to the current one
            kc[row, :, c + 1 - count:c + 1] = k[:, offset:offset + count]
            vc[row, :, c + 1 - count:c + 1] = v[:, offset:offset + count]
            keys, values = kc[row:row + 1, :, start:c + 1], vc[row:row + 1, :, start:c + 1]
            out.append(attention(q[:, :, offset:offset + count], keys, values, mask, mask is None, scale)[0])
        return (out[0] if len(out) == 1 else torch.cat(out, dim=1)).unsqueeze(0)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slice of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.qk_norm = config.qk_norm
        self.scale = config.attn_scale or None  # None: SDPA's 1/sqrt(head_dim)
        self.ve_gate = (nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)
                        if config.ve_gate and config.has_value_embedding(layer_idx) else None)
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | SlotCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # this layer's value embedding of the same tokens (B, T, kv_heads·d)
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            if self.ve_gate is not None:  # per token and head, in (0, 2), starting at 1
                ve = ve * (2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))).unsqueeze(-1)
            v = v + ve
        v = v.transpose(1, 2)
        if self.qk_norm:  # before or after RoPE is the same: a rotation keeps the RMS
            q, k = norm(q), norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is None:  # every row from position 0: plain causal attention
            y = attention(q, k, v, None, True, self.scale)
        else:  # the cache stores k, v and knows which of its keys each token may see
            y = kv_cache.attend(self.layer_idx, q, k, v, self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=False) if self.swiglu else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.silu(self.c_gate(x)) * h if self.swiglu else F.relu(h).square()
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | SlotCache | None) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(self.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        kv_dim = config.kv_heads * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(self.padded_vocab_size, kv_dim)
                                           for i in range(config.depth) if config.has_value_embedding(i)})
        if config.smear:
            self.smear_gate = nn.Parameter(torch.zeros(SMEAR_CHANNELS + 1))  # weights on x[:16], then the strength
        if config.bigram_multiple:
            self.bigram_embed = nn.Embedding(config.bigram_multiple * self.padded_vocab_size, config.n_embd)
        if config.x0_skip:
            self.resid_lambdas = nn.Parameter(torch.ones(config.depth))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.depth))
        # Not saved with the weights: recomputed from the config.
        n_pos = ROPE_HEADROOM * config.sequence_len
        self.register_buffer("cos", torch.empty(n_pos, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(n_pos, config.head_dim // 2), persistent=False)
        self.init_weights()

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head (`padded_vocab`)."""
        return padded_vocab(self.vocab_size)

    @property
    def max_positions(self) -> int:
        """Positions the rotary tables cover: the longest sequence (prompt plus generation) it can run."""
        return self.cos.size(0)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw fresh weights and fill the rotary tables. Also the way to materialise a model built
        on the meta device: `model.to_empty(device=...)` then `model.init_weights()`."""
        cfg = self.config
        cos, sin = rotary_tables(self.max_positions, cfg.head_dim, cfg.rope_theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc, block.mlp.c_gate):
                if linear is not None:  # std 1/√fan_in keeps activations at unit scale
                    nn.init.normal_(linear.weight, std=cfg.n_embd ** -0.5)
            # Zero output projections: every block starts as the identity on the residual stream.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if cfg.tie_embeddings:
            # One matrix for both ends: the input is RMS-normed anyway, and this std gives unit-scale logits.
            nn.init.normal_(self.wte.weight, std=cfg.n_embd ** -0.5)
        else:
            # The embedding scale is irrelevant (RMSNorm follows); a small head gives near-uniform
            # predictions, an initial loss of about ln(vocab_size).
            nn.init.normal_(self.wte.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=0.001)
        for ve in self.value_embeds.values():  # the scale of the values they are added to
            nn.init.normal_(ve.weight, std=1.0)
        for block in self.blocks:
            if block.attn.ve_gate is not None:  # gate 2·sigmoid(0) = 1
                nn.init.zeros_(block.attn.ve_gate.weight)
        if cfg.smear:  # strength 0: starts as the plain embedding
            self.smear_gate.zero_()
        if cfg.bigram_multiple:  # starts as the plain embedding
            nn.init.zeros_(self.bigram_embed.weight)
        if cfg.x0_skip:  # start as the plain residual stream
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.zero_()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: Literal["mean", "sum"] = "mean", kv_cache: KVCache | SlotCache | None = None,
                loss_weights: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T; -1 = no loss there): the cross-entropy, mean over
        the counted positions (0 when there are none) or their sum; with `loss_weights` (B, T), each
        position's cross-entropy times its weight (RL: the advantage of the rollout it belongs to).
        Else float32 logits (B, T, vocab), or (B, K, vocab) at the K positions `logits_at` names (the
        head's matmul only where a token will be sampled). With a kv_cache, idx are the next T tokens
        of every row (a prompt, then one at a time), or the pass a SlotCache scheduled."""
        T = idx.size(1)
        if kv_cache is None:  # every row starts at position 0: plain causal attention, no mask
            if T > self.max_positions:
                raise NanochatError(f"sequence of {T} tokens is longer than the model's {self.max_positions} positions")
            positions = slice(0, T)
        else:
            positions = kv_cache.positions(T)
        cos, sin = self.cos[positions], self.sin[positions]

        x = norm(self.wte(idx))
        if self.config.smear or self.config.bigram_multiple:
            x = self._add_previous_token(idx, x, kv_cache)
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.config.x0_skip:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, kv_cache)
        x = norm(x)

        head = self.lm_head.weight[:self.vocab_size]  # the padded rows are never a target
        if targets is None:  # soft-cap: smoothly bound logits to ±cap
            return _capped_logits(x if logits_at is None else x[:, logits_at], head, self.config.logit_softcap)
        weights = None if loss_weights is None else loss_weights.reshape(-1).float()
        loss = head_loss(x.flatten(0, 1), head, targets.reshape(-1), self.config.logit_softcap, token_weights=weights)
        if loss_reduction == "sum":
            return loss
        return loss / (targets != -1).sum().clamp(min=1)

    def _add_previous_token(self, idx: torch.Tensor, x: torch.Tensor,
                            kv_cache: KVCache | SlotCache | None) -> torch.Tensor:
        """Mix what the previous token was into each token's embedding (smear and/or bigram hash).
        The previous token is the one before in the row, or (the cache knows) the row's last cached
        token; a token at position 0 (a row's first real token) has none."""
        if kv_cache is None:  # training: no token before a row's first, so nothing to look up for it
            prev = torch.cat((torch.zeros_like(idx[:, :1]), idx[:, :-1]), dim=1)
            has_prev = torch.ones_like(idx, dtype=torch.bool)
            has_prev[:, 0] = False
            prev_x = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1) if self.config.smear else None
        else:
            prev, has_prev = kv_cache.previous(idx)
            prev_x = norm(self.wte(prev)) if self.config.smear else None  # x of each previous token
        if self.config.smear:
            # x_t += λ·sigmoid(w·x_t[:16])·x_{t-1}: how much of the previous token each token takes in.
            prev_x = prev_x * has_prev.unsqueeze(-1)
            w, strength = self.smear_gate[:-1], self.smear_gate[-1]
            gate = strength * torch.sigmoid(x[..., :SMEAR_CHANNELS] @ w.to(x.dtype))
            x = x + gate.unsqueeze(-1) * prev_x
        if self.config.bigram_multiple:
            # Bucket of the pair (previous, current); "no previous token" is id vocab_size, a pair of its own.
            prev = torch.where(has_prev, prev, self.vocab_size)
            bucket = (prev * BIGRAM_MULTIPLIER + idx) % self.bigram_embed.num_embeddings
            x = norm(x + self.bigram_embed(bucket))
        return x

    def new_kv_cache(self, batch_size: int, max_len: int, pad: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` slots (pad slots included); `pad`
        is each row's number of left-pad tokens. dtype: what k/v are computed in; by default the
        autocast dtype when autocast is on for the model's device (half the memory of fp32 in bf16),
        else the weights' dtype."""
        if max_len > self.max_positions:
            raise NanochatError(f"max_len {max_len} exceeds the model's {self.max_positions} rotary positions")
        cfg, weight = self.config, self.lm_head.weight
        if dtype is None:
            device_type = weight.device.type
            autocast = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        return KVCache(cfg.depth, batch_size, cfg.kv_heads, max_len, cfg.head_dim, pad, weight.device, dtype)

    def new_slot_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None) -> SlotCache:
        """An empty SlotCache of `slots` rows of up to `max_len` positions each (continuous batching)."""
        if max_len > self.max_positions:
            raise NanochatError(f"max_len {max_len} exceeds the model's {self.max_positions} rotary positions")
        cfg, weight = self.config, self.lm_head.weight
        return SlotCache(cfg.depth, slots, cfg.kv_heads, max_len, cfg.head_dim, weight.device, dtype or weight.dtype)

    def lookup_tables(self) -> list[nn.Parameter]:
        """The weights used as lookups rather than matmuls: the token, value and bigram embeddings."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied matrix once). exclude_embeddings drops the lookup tables; a tied head's
        matrix is still counted, as the head uses it."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(w.numel() for w in self.lookup_tables() if w is not self.lm_head.weight)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, the PaLM accounting:

        6·N for the matmuls with weights, N = every parameter except the embedding lookup (all block
        matrices plus the head, over the padded vocabulary); 2 FLOPs per multiply-add forward, twice
        that backward. Plus attention's two activation matmuls (q·kᵀ and attention·v), each 2·T·d_q
        forward per token and layer with d_q = n_head·head_dim, ×3 for backward: 12·depth·d_q·T.
        As is customary, the causal mask's skipped half is not subtracted.
        """
        cfg = self.config
        T = seq_len or cfg.sequence_len
        return 6 * self.num_params(exclude_embeddings=True) + 12 * cfg.depth * cfg.n_head * cfg.head_dim * T
