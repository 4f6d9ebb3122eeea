"""The inference engine: KV-cache generation with sampling, stop tokens and calculator tool use.

Prefill the prompt once, then one token per step for every row of a batch (several completions
of one prompt, or several prompts right-aligned in the cache). Each step a row either samples its
next token, or — while it owes forced tokens — takes the next forced one: when a row closes a
tool call `<|python_start|>expr<|python_end|>`, the calculator's result is queued as
`<|output_start|>result<|output_end|>` and fed to the model token by token, exactly as the chat
training data shows it. A row ends at `<|assistant_end|>` (or `<|bos|>`) or at its token budget.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from nanochat.calculator import CalculatorError, calculate
from nanochat.errors import NanochatError
from nanochat.gpt import GPT
from nanochat.runtime import Runtime
from nanochat.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens, and how many it may write."""

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


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator) -> torch.Tensor:
    """One token per row from (B, V) logits: argmax at temperature 0, else from the top-k and
    nucleus (top-p) restricted distribution."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, rt: Runtime):
        self.model, self.tok, self.rt = model, tokenizer, rt
        sid = tokenizer.special_id
        self.stop = {sid("<|assistant_end|>"), sid("<|bos|>")}
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")

    @property
    def context(self) -> int:
        """Most tokens one sequence (prompt and reply) may hold: the model's rotary positions."""
        return self.model.cos.size(0)

    def _tool_result(self, call: list[int]) -> list[int]:
        try:
            result = calculate(self.tok.decode(call))
        except CalculatorError as e:
            result = f"error: {e}"
        return [self.output_start, *self.tok.encode_ordinary(result), self.output_end]

    # inference_mode, not no_grad: no autograd bookkeeping at all (not even version counters), which
    # is about a sixth of a small model's decode step on a CPU (benchmarks/README.md, Generation).
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 sampling: Sequence[Sampling] | None = None) -> Iterator[list[int | None]]:
        """Yield, each step, the next token of every row (None for rows that have finished).

        Every row shares the scalar settings and one random stream, unless `sampling` gives each
        row its own (one per prompt): then a row's tokens depend on its own prompt, settings and
        seed alone, not on which other rows share the batch — what a server batching requests needs.
        """
        model, rt = self.model, self.rt
        shared = sampling is None
        if sampling is None:
            sampling = [Sampling(max_tokens, temperature, top_k, top_p, seed)] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(sampling)} sampling settings for {len(prompts)} prompts")
        limit, width = self.context, max(map(len, prompts))
        budget = max(s.max_tokens for s in sampling)
        if width + budget > limit:
            raise ValueError(f"prompt ({width} tokens) + max_tokens ({budget}) exceeds the model's {limit} "
                             "positions")
        pad = torch.tensor([width - len(p) for p in prompts])
        idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=rt.device)
        cache = model.new_kv_cache(len(prompts), width + budget, pad=pad, dtype=rt.autocast_dtype or torch.float32)
        generators = [torch.Generator(device=rt.device).manual_seed(s.seed) for s in sampling[:1 if shared else None]]
        rows = [_Row(left=s.max_tokens) for s in sampling]
        was_training = model.training
        model.eval()
        try:
            yield from self._decode(rows, idx, cache, sampling, generators)
        finally:
            model.train(was_training)

    def _sample(self, logits: torch.Tensor, rows: list[_Row], sampling: Sequence[Sampling],
                generators: list[torch.Generator]) -> list[int]:
        if len(generators) == 1:
            s = sampling[0]
            return sample(logits, s.temperature, s.top_k, s.top_p, generators[0]).tolist()
        return [0 if row.done else sample(logits[i:i + 1], s.temperature, s.top_k, s.top_p, g).item()
                for i, (row, s, g) in enumerate(zip(rows, sampling, generators, strict=True))]

    def _decode(self, rows, idx, cache, sampling, generators):
        model, rt = self.model, self.rt
        with rt.autocast():
            logits = model(idx, kv_cache=cache)[:, -1]
        while True:
            step: list[int | None] = []
            for row, token in zip(rows, self._sample(logits, rows, sampling, generators), strict=True):
                if row.done:
                    step.append(None)
                    continue
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
                step.append(token)
            yield step
            if all(r.done for r in rows):
                return
            next_ids = torch.tensor([[t if t is not None else 0] for t in step], device=rt.device)
            with rt.autocast():
                logits = model(next_ids, kv_cache=cache)[:, -1]

    def complete(self, prompts: list[list[int]], **kwargs) -> list[list[int]]:
        """Every row's generated tokens (its stop token included when it stopped)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate(prompts, **kwargs):
            for row, token in zip(out, step, strict=True):
                if token is not None:
                    row.append(token)
        return out

    def stream_text(self, prompt: list[int], **kwargs) -> ReplyStream:
        """The visible text of one completion as it is generated (see ReplyStream)."""
        return ReplyStream(self, prompt, **kwargs)


class ReplyText:
    """Turns one row's generated tokens into the text a person should see, token by token.

    A UTF-8 character split across tokens is held back until it is whole. Special tokens are not
    shown: the stop token ends the reply, and a tool call `<|python_start|>23*17<|python_end|>
    <|output_start|>391<|output_end|>` reads `[23*17 = 391]`, set off from the words around it by
    a space (the chat format puts none there: "Let me compute that.[23*17 = 391] The answer…").
    `tokens` holds every token fed (as OpenAI's usage counts them); `finish_reason` is "stop"
    once the model closed its turn, else "length".
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokens: list[int] = []
        self.finish_reason = "length"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._specials = set(engine.tok.special_tokens.values())
        self._marks = {engine.python_start: "[", engine.python_end: " = ", engine.output_end: "]"}
        self._last = ""  # the last character shown
        self._after_tool = False  # a tool call just closed: a word that follows gets a space first

    def feed(self, token: int) -> str:
        """The text that `token` makes visible (often "", e.g. half a character)."""
        engine = self.engine
        self.tokens.append(token)
        if token in engine.stop:
            self.finish_reason = "stop"
            return self.flush()
        if token in self._specials:
            text = self._decoder.decode(b"", final=True)  # a character cut short by the special token
            before = (text or self._last)[-1:]
            if token == engine.python_start and before and not before.isspace():
                text += " "
            text += self._marks.get(token, "")
        else:
            text = self._decoder.decode(engine.tok.decode_bytes([token]))
            if self._after_tool and text:
                text = (" " if text[0].isalnum() else "") + text
        if text:
            self._after_tool = token == engine.output_end
            self._last = text[-1]
        return text

    def flush(self) -> str:
        """Whatever is held back (an unfinished character shows as U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class ReplyStream(ReplyText):
    """One completion's visible text, piece by piece: iterate it, then read `finish_reason` and
    `tokens` (see ReplyText)."""

    def __init__(self, engine: Engine, prompt: list[int], **kwargs):
        super().__init__(engine)
        self.prompt, self.kwargs = prompt, kwargs

    def __iter__(self) -> Iterator[str]:
        for (token,) in self.engine.generate([self.prompt], **self.kwargs):
            if token is None:
                break
            text = self.feed(token)
            if text:
                yield text
        tail = self.flush()
        if tail:
            yield tail


# ---------------------------------------------------------------------------------------------
# Which model to talk to (shared by `nanochat chat` and `nanochat serve`)


@dataclass
class ModelSource:
    run: str = "tiny"
    """Run whose model to load (NANOCHAT_HOME/runs/<run>)."""
    stage: Literal["auto", "sft", "mid", "base"] = "auto"
    """Which of the run's models; `auto` takes the most finished one (sft, else mid, else base)."""
    checkpoint: str = ""
    """A checkpoint directory to load instead (overrides --run and --stage)."""
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"


def load_engine(source: ModelSource, rt: Runtime) -> tuple[Engine, str]:
    """An engine over the model `source` names, and that model's display name (`run/stage@step`)."""
    from nanochat.checkpoint import latest_checkpoint
    from nanochat.train.chat import load_model, stage_dir

    if source.checkpoint:
        path = Path(source.checkpoint)
        if not (path / "meta.json").is_file():
            raise NanochatError(f"{path} is not a checkpoint directory (no meta.json); pass a "
                                "runs/<run>/…/checkpoints/step_NNNNNN folder")
        name = path.name
    else:
        stages = ("sft", "mid", "base") if source.stage == "auto" else (source.stage,)
        found = [(s, p) for s in stages if (p := latest_checkpoint(stage_dir(source.run, s))) is not None]
        if not found:
            raise NanochatError(f"run '{source.run}' has no {' / '.join(stages)} model under "
                                f"{stage_dir(source.run, 'base')}; train one with `nanochat speedrun` or pick "
                                "another with --run / --checkpoint")
        stage, path = found[0]
        name = f"{source.run}/{stage}"
    model, tok, meta = load_model(path, rt)
    return Engine(model, tok, rt), f"{name}@{meta.get('step', 0)}"
