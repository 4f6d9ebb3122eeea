"""The inference engine: KV-cache generation with sampling, stop tokens and calculator tool use.

Prefill the prompt once, then one token per step for every row of a batch (several completions
of one prompt, or several prompts right-aligned in the cache). Each step a row either samples its
next token, or — while it owes forced tokens — takes the next forced one: when a row closes a
tool call `<|python_start|>expr<|python_end|>`, the calculator's result is queued as
`<|output_start|>result<|output_end|>` and fed to the model token by token, exactly as the chat
training data shows it. A row ends at `<|assistant_end|>` (or `<|bos|>`) or at its token budget.

How rows pick tokens is one `Sampling` (token budget, temperature, top-k, top-p, seed), the same
value from an HTTP request through the server's job queue to `Engine.generate`: one for the whole
batch, or one per prompt. A row's seed fixes its random draws, one uniform number per token it
writes (`random_draws`); `sample` turns a step's draws into tokens for all rows at once, each
with its own settings. Turning the tokens back into text is the chat format's business
(nanochat.chat_format); `load_engine` finds and loads a trained model through nanochat.runs, so
inference never imports the training package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from nanochat.calculator import CalculatorError, calculate
from nanochat.chat_format import ReplyText, stop_ids
from nanochat.config import ModelSource
from nanochat.gpt import GPT, eval_mode
from nanochat.runs import display_name, find_model, load_model
from nanochat.runtime import Runtime
from nanochat.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How a row picks its tokens, and how many it may write. Temperature 0 is greedy (argmax);
    top_k / top_p (None: off) restrict the distribution sampled from; seed seeds the row's
    random stream (or the batch's, when every row shares one Sampling)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


@dataclass
class _Row:
    left: int  # tokens the row may still write
    forced: list[int] = field(default_factory=list)  # tokens owed to the model before sampling again
    tool: list[int] | None = None  # tokens of an open tool call, if one is being written
    done: bool = False
    sampled: bool = True  # the row's latest token was the model's choice (False: forced, a tool's output)


def restricts(s: Sampling, vocab_size: int) -> bool:
    """Whether top-k or top-p cut anything off the distribution a row samples from."""
    return bool(s.top_k and s.top_k < vocab_size) or (s.top_p is not None and s.top_p < 1.0)


def sample(logits: torch.Tensor, settings: Sampling | Sequence[Sampling], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (B, V) logits: row b with its own settings (or one Sampling for all)
    and its own uniform draw uniforms[b] in [0, 1). Argmax at temperature 0; else the token whose
    interval of the cumulative distribution holds the draw (inverse transform sampling), over the
    top-k and nucleus (top-p) restricted distribution at the row's temperature.

    One draw per row and step, the rows in one batch of tensor operations: the same distribution
    as `torch.multinomial` row by row, at a small fraction of its cost for a batch of rows. The
    tokens are laid out most likely first only for rows that top-k or top-p restrict (they must be
    sorted to be cut); the others take the vocabulary's order, and no sort: sorting 8 rows of the
    tiny model's 4,096 logits was a quarter of a decode step on the CPU."""
    B, V = logits.shape
    rows = [settings] * B if isinstance(settings, Sampling) else list(settings)
    greedy = logits.argmax(-1)
    if all(s.temperature <= 0 for s in rows):
        return greedy
    tokens = greedy
    device = logits.device
    for cut in (False, True):  # each row by the one rule its own settings pick, so its token is the same in any batch
        group = [b for b, s in enumerate(rows) if s.temperature > 0 and restricts(s, V) == cut]
        if not group:
            continue
        whole = len(group) == B
        index = None if whole else torch.tensor(group, device=device)
        scaled = (logits if whole else logits[index]).float() / torch.tensor(
            [rows[b].temperature for b in group], device=device)[:, None]
        drawn_from = uniforms if whole else uniforms[index]
        drawn = (_sample_restricted(scaled, [rows[b] for b in group], drawn_from) if cut
                 else _inverse_cdf(torch.softmax(scaled, -1), drawn_from))  # the whole vocabulary, in its order
        tokens = drawn if whole else tokens.index_copy(0, index, drawn)
    return tokens


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the index whose interval of the cumulative distribution holds the draw; a draw that
    rounds onto the total stops just below it, so the index always has a positive probability."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    target = torch.minimum(uniforms.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0]


def _sample_restricted(scaled: torch.Tensor, rows: list[Sampling], uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens of rows top-k and/or top-p restrict: the kept tokens, most likely first."""
    V, device = scaled.size(1), scaled.device
    top_k = [min(s.top_k or V, V) for s in rows]
    width = max(top_k)
    values, ids = torch.topk(scaled, width)  # sorted, most likely first
    if min(top_k) < width:
        values = values.masked_fill(torch.arange(width, device=device) >= torch.tensor(top_k, device=device)[:, None],
                                    float("-inf"))
    probs = torch.softmax(values, -1)
    if any(s.top_p is not None and s.top_p < 1.0 for s in rows):
        top_p = torch.tensor([s.top_p if s.top_p is not None and s.top_p < 1.0 else float("inf") for s in rows],
                             device=device)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p[:, None], 0.0)  # the smallest prefix reaching top_p
    return ids.gather(1, _inverse_cdf(probs, uniforms)[:, None])[:, 0]


def random_draws(settings: Sequence[Sampling], shared: bool, device: torch.device) -> torch.Tensor:
    """(B, longest budget) uniform draws, row b's t-th for its t-th token: from one stream per row
    seeded with its Sampling's seed, or with `shared` one stream for the batch."""
    budget = max(s.max_tokens for s in settings)
    if shared:
        g = torch.Generator(device=device).manual_seed(settings[0].seed)
        return torch.rand(len(settings), budget, generator=g, device=device)
    return torch.stack([torch.rand(budget, generator=torch.Generator(device=device).manual_seed(s.seed),
                                   device=device) for s in settings])


def draw_index(row: _Row, s: Sampling) -> int:
    """Which of its draws a row uses for its next token: the t-th once it has written t tokens (the
    same rule in Engine and ContinuousBatch, so a sequence samples alike in both)."""
    return s.max_tokens - row.left


def draws_now(draws: torch.Tensor, rows: Sequence[_Row], settings: Sequence[Sampling]) -> torch.Tensor:
    """Each row's draw for its next token (a finished row's index is clamped; its token is unused)."""
    at = [min(draw_index(row, s), draws.size(1) - 1) for row, s in zip(rows, settings, strict=True)]
    return draws[torch.arange(len(at), device=draws.device), torch.tensor(at, device=draws.device)]


def left_padded(prompts: Sequence[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts right-aligned in one (B, longest) id tensor, and each row's number of pad tokens
    (what a KVCache needs to give every row its own positions)."""
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts])
    return torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device), pad


class Engine:
    """Generation over one model and its tokenizer, on one runtime (device and autocast dtype)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, rt: Runtime):
        self.model, self.tok, self.rt = model, tokenizer, rt
        sid = tokenizer.special_id
        self.stop = stop_ids(tokenizer)
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")

    @property
    def context(self) -> int:
        """Most tokens one sequence (prompt and reply) may hold: the model's rotary positions."""
        return self.model.max_positions

    def _tool_result(self, call: list[int]) -> list[int]:
        try:
            result = calculate(self.tok.decode(call))
        except CalculatorError as e:
            result = f"error: {e}"
        return [self.output_start, *self.tok.encode_ordinary(result), self.output_end]

    # inference_mode, not no_grad: no autograd bookkeeping at all (not even version counters), which
    # is about a sixth of a small model's decode step on a CPU (benchmarks/README.md, Generation).
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: Sampling | Sequence[Sampling]
                 ) -> Iterator[list[int | None]]:
        """Yield, each step, the next token of every row (None for rows that have finished).

        One `Sampling`: every row shares it and one random stream (seeded once for the batch). A
        sequence of them, one per prompt: each row has its own settings and random stream, so its
        tokens depend on its own prompt, settings and seed alone, not on which other rows share the
        batch — what a server batching requests needs. (Up to floating-point rounding, which depends
        on the batch's shape: it rarely changes a token in fp32 and often does in bf16;
        benchmarks/batched_vs_alone.py.)
        """
        rows, idx, cache, settings, draws = self._prepare(prompts, sampling)
        with eval_mode(self.model):
            yield from self._decode(rows, idx, cache, settings, draws)

    @torch.inference_mode()
    def rollout(self, prompts: list[list[int]], sampling: Sampling | Sequence[Sampling]
                ) -> list[tuple[list[int], list[bool]]]:
        """Every row's generated tokens (as `complete`) and, token by token, whether the model chose
        it (True) or the engine forced it (False: a calculator result, <|output_start|> to
        <|output_end|>): what reinforcement learning may and may not credit to the model."""
        rows, idx, cache, settings, draws = self._prepare(prompts, sampling)
        out: list[tuple[list[int], list[bool]]] = [([], []) for _ in prompts]
        with eval_mode(self.model):
            for step in self._decode(rows, idx, cache, settings, draws):
                for (tokens, chosen), token, row in zip(out, step, rows, strict=True):
                    if token is not None:
                        tokens.append(token)
                        chosen.append(row.sampled)
        return out

    def _prepare(self, prompts: list[list[int]], sampling: Sampling | Sequence[Sampling]):
        """Rows, the left-padded prompt ids, an empty cache, and the random draws of one generation."""
        model, rt = self.model, self.rt
        shared = isinstance(sampling, Sampling)
        settings = [sampling] * len(prompts) if shared else list(sampling)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(settings)} sampling settings for {len(prompts)} prompts")
        limit, width = self.context, max(map(len, prompts))
        budget = max(s.max_tokens for s in settings)
        if width + budget > limit:
            raise ValueError(f"prompt ({width} tokens) + max_tokens ({budget}) exceeds the model's {limit} "
                             "positions")
        idx, pad = left_padded(prompts, rt.device)
        cache = model.new_kv_cache(len(prompts), width + budget, pad=pad, dtype=rt.autocast_dtype or torch.float32)
        rows = [_Row(left=s.max_tokens) for s in settings]
        return rows, idx, cache, settings, random_draws(settings, shared, rt.device)

    def _advance(self, row: _Row, token: int) -> int:
        """The row's next token given what the model sampled: a token the calculator owes it comes
        first; a finished tool call queues its result. Updates the row's budget and state."""
        row.sampled = not row.forced
        if row.forced:
            token = row.forced.pop(0)
        elif token == self.python_start:
            row.tool = []
        elif token == self.python_end and row.tool is not None:
            row.forced, row.tool = self._tool_result(row.tool), None
        elif row.tool is not None:
            row.tool.append(token)
        row.left -= 1
        row.done = token in self.stop or row.left == 0
        return token

    def _decode(self, rows, idx, cache, settings, draws):
        model, rt = self.model, self.rt
        with rt.autocast():
            logits = model(idx, kv_cache=cache)[:, -1]
        while True:
            step: list[int | None] = []
            tokens = sample(logits, settings, draws_now(draws, rows, settings)).tolist()
            for row, token in zip(rows, tokens, strict=True):
                step.append(None if row.done else self._advance(row, token))
            yield step
            if all(r.done for r in rows):
                return
            next_ids = torch.tensor([[t if t is not None else 0] for t in step], device=rt.device)
            with rt.autocast():
                logits = model(next_ids, kv_cache=cache)[:, -1]

    def complete(self, prompts: list[list[int]], sampling: Sampling | Sequence[Sampling]) -> list[list[int]]:
        """Every row's generated tokens (its stop token included when it stopped); `sampling` as
        for `generate`."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate(prompts, sampling):
            for row, token in zip(out, step, strict=True):
                if token is not None:
                    row.append(token)
        return out

    def stream_text(self, prompt: list[int], sampling: Sampling) -> ReplyStream:
        """The visible text of one completion as it is generated (see ReplyStream)."""
        return ReplyStream(self, prompt, sampling)


@dataclass(eq=False)
class _Prompt:
    """An admitted prompt not yet wholly fed to the model: its first slot takes the prefill, the
    others (more completions of it) copy that slot once it is done."""

    slots: list[int]
    tokens: list[int]
    fed: int = 0  # tokens of it the model has seen


class ContinuousBatch:
    """Continuous (in-flight) batching over one engine: up to `slots` sequences in flight, each with
    its own row of a SlotCache; every `step` is one forward pass that decodes one token for every
    running sequence and, alongside, prefills what it can of newly admitted prompts (up to
    `prefill_chunk` prompt tokens a step; a longer prompt continues in the next steps). A sequence
    admitted between steps gets its first token from the next step, and one that finishes leaves
    at once, freeing its slot. Each sequence has its own Sampling and random stream and attends to
    its own row only, so its tokens are the ones Engine.generate writes for it alone (greedy, or
    seeded sampling), as far as floating-point rounding, which depends on the batch's shape, lets
    them be: it rarely changes a token in fp32 and often does in bf16 (benchmarks/batched_vs_alone.py)."""

    def __init__(self, engine: Engine, slots: int, max_len: int | None = None, prefill_chunk: int = 512):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be ≥ 1 (got {prefill_chunk})")
        self.engine, model = engine, engine.model
        rt = engine.rt
        self.max_len = min(max_len or engine.context, engine.context)
        self.prefill_chunk = prefill_chunk
        self.cache = model.new_slot_cache(slots, self.max_len, dtype=rt.autocast_dtype or torch.float32)
        self.rows: list[_Row | None] = [None] * slots
        self.sampling: list[Sampling | None] = [None] * slots
        self.draws: list[list[float] | None] = [None] * slots  # each row's random draws, one per token
        self.prompts: list[_Prompt] = []  # admitted, first come first served, not yet wholly prefilled
        self.pending: dict[int, int] = {}  # slot -> the token it sampled last, not yet fed to the model
        self._modules = tuple(model.modules())  # for eval_mode's check, every step

    @property
    def free(self) -> int:
        return self.rows.count(None)

    @property
    def running(self) -> int:
        """Slots taken: sequences being written, and admitted ones waiting for their prefill."""
        return len(self.rows) - self.free

    def fits(self, prompt: list[int], sampling: Sampling) -> bool:
        return len(prompt) + sampling.max_tokens <= self.max_len

    def admit(self, prompt: list[int], sampling: Sampling, copies: int = 1) -> list[int]:
        """Give `prompt` `copies` free slots (several completions of one prompt, sharing its
        prefill; copy i samples with seed + i, so copy 0 is the single completion); returns the
        slots. Its prompt goes through the model with the next step, which also samples its first
        token."""
        return self.admit_many([(prompt, sampling, copies)])[0]

    def admit_many(self, requests: Sequence[tuple[list[int], Sampling, int]]) -> list[list[int]]:
        """Admit several (prompt, sampling, copies) at once; returns each one's slots."""
        for prompt, sampling, _ in requests:
            if not prompt:
                raise ValueError("an empty prompt: there is nothing to continue")
            if not self.fits(prompt, sampling):
                raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                                 f"batch's {self.max_len} positions")
        wanted = sum(copies for _, _, copies in requests)
        if wanted > self.free:
            raise ValueError(f"{wanted} completions need {wanted} free slots; {self.free} are free")
        device = self.engine.rt.device
        free = iter([i for i, row in enumerate(self.rows) if row is None])
        out = []
        for prompt, sampling, copies in requests:
            slots = [next(free) for _ in range(copies)]
            for i, slot in enumerate(slots):
                self.cache.reset(slot)
                self.rows[slot] = _Row(left=sampling.max_tokens)
                self.sampling[slot] = dataclasses.replace(sampling, seed=sampling.seed + i)
                self.draws[slot] = random_draws([self.sampling[slot]], True, device)[0].tolist()
            self.prompts.append(_Prompt(slots, list(prompt)))
            out.append(slots)
        return out

    def release(self, slot: int) -> None:
        """Free a slot (its sequence finished, or nobody wants the rest)."""
        self.rows[slot] = self.sampling[slot] = self.draws[slot] = None
        self.pending.pop(slot, None)
        self.cache.reset(slot)  # its columns need not be kept when the cache's rows move
        for prompt in self.prompts:
            if slot in prompt.slots:
                if slot == prompt.slots[0]:  # its prefill lived in this slot: start over in the next one
                    prompt.fed = 0
                prompt.slots.remove(slot)
                if prompt.slots:
                    self.cache.reset(prompt.slots[0])
        self.prompts = [prompt for prompt in self.prompts if prompt.slots]

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int, bool]]:
        """One forward pass: the tokens sampled last step go in (one each), with the next chunks of
        waiting prompts; then every sequence whose logits came out samples its next token.
        Returns [(slot, token, finished)]; finished slots are freed."""
        engine, rt = self.engine, self.engine.rt
        feeds: list[tuple[int, list[int]]] = [(slot, [token]) for slot, token in sorted(self.pending.items())]
        sampled = [slot for slot, _ in feeds]  # slots whose logits this pass makes, and (below) the feed each reads
        reads = list(range(len(feeds)))
        budget, prefilled = self.prefill_chunk, []
        for prompt in self.prompts:
            if budget <= 0:
                break
            chunk = prompt.tokens[prompt.fed:prompt.fed + budget]
            feeds.append((prompt.slots[0], chunk))
            prompt.fed += len(chunk)
            budget -= len(chunk)
            if prompt.fed == len(prompt.tokens):
                prefilled.append(prompt)
                sampled += prompt.slots
                reads += [len(feeds) - 1] * len(prompt.slots)
        if not feeds:
            return []
        self.pending.clear()
        self.prompts = [prompt for prompt in self.prompts if prompt not in prefilled]
        ids, last = self.cache.schedule(feeds)
        wanted = sorted(set(reads))  # the feeds whose logits are sampled from, and where they are in the pass
        at = [last[i] for i in wanted]
        at = None if at == list(range(ids.size(1))) else torch.tensor(at, device=rt.device)  # None: every token's
        with eval_mode(engine.model, self._modules), rt.autocast():
            logits = engine.model(ids, kv_cache=self.cache, logits_at=at)[0]
        for prompt in prefilled:  # more completions of one prompt start from a copy of its prefill
            for slot in prompt.slots[1:]:
                self.cache.copy(prompt.slots[0], slot)
        if not sampled:
            return []
        row_of = {feed: i for i, feed in enumerate(wanted)}
        rows, settings = [self.rows[slot] for slot in sampled], [self.sampling[slot] for slot in sampled]
        draws = torch.tensor([self.draws[slot][draw_index(row, s)] for slot, row, s in zip(sampled, rows, settings,
                                                                                            strict=True)])
        if reads != wanted:  # a feed read by several slots, or one read by none: pick each slot's row
            logits = logits[torch.tensor([row_of[feed] for feed in reads], device=rt.device)]
        tokens = sample(logits, settings, draws.to(rt.device)).tolist()
        out = []
        for slot, row, token in zip(sampled, rows, tokens, strict=True):
            token = engine._advance(row, token)
            out.append((slot, token, row.done))
            if row.done:
                self.release(slot)
            else:
                self.pending[slot] = token
        return out


class ReplyStream(ReplyText):
    """One completion's visible text, piece by piece: iterate it, then read `finish_reason` and
    `tokens` (see chat_format.ReplyText)."""

    def __init__(self, engine: Engine, prompt: list[int], sampling: Sampling):
        super().__init__(engine.tok)
        self.engine, self.prompt, self.sampling = engine, prompt, sampling

    def __iter__(self) -> Iterator[str]:
        for (token,) in self.engine.generate([self.prompt], self.sampling):
            if token is None:
                break
            text = self.feed(token)
            if text:
                yield text
        tail = self.flush()
        if tail:
            yield tail


def load_engine(source: ModelSource, rt: Runtime) -> tuple[Engine, str]:
    """An engine over the model `source` names, and that model's display name (`run/stage@step`)."""
    path, name = find_model(source.run, source.stage, source.checkpoint)
    model, tok, meta = load_model(path, rt)
    return Engine(model, tok, rt), display_name(name, meta)
