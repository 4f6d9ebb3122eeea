"""The tokenizer: byte-level BPE, token for token equal to tiktoken, with a Rust core.

`nanochat._bpe` (rust/src) does the hot loops: pre-tokenization, BPE encoding (batches on
several threads without the GIL) and training. This module owns the API: special tokens and
tiktoken's allowed/disallowed rules, and files. It is a low layer that imports no other part of
nanochat's pipeline: the chat format built on the special tokens is in nanochat.chat_format, the
`nanochat tokenizer train|eval` command line in nanochat.train.tokenizer.

On disk a tokenizer is a directory with `tokenizer.tiktoken` (tiktoken's rank file: base64 of
the token bytes, a space, the rank, one token per line) and `tokenizer.json` (name, split
pattern, special tokens), so any tiktoken user can load it (see `to_tiktoken`).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

from nanochat import _bpe
from nanochat.errors import NanochatError

# The chat format's tokens (DESIGN.md, nanochat/chat_format.py). Appended after the trained ranks, in this order.
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# OpenAI's published encodings: split pattern name, special tokens, SHA-256 of the rank file.
OFFICIAL = {
    "cl100k_base": {
        "pattern": "cl100k",
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "special_tokens": {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                           "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    },
    "o200k_base": {
        "pattern": "o200k",
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "special_tokens": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    },
}

RANKS_FILE, META_FILE = "tokenizer.tiktoken", "tokenizer.json"


class TokenizerError(NanochatError, ValueError):
    """Bad tokenizer input a user can fix: a file, a pattern, a special token, a message."""


class DisallowedSpecialTokenError(TokenizerError):
    """The text contains a special token that the call did not allow."""


def _core_call(fn, *args):
    """Run a core function, turning its ValueErrors (bad pattern, bad id) into TokenizerError.
    Text with lone surrogates, which UTF-8 cannot hold, is retried with them replaced by U+FFFD
    as tiktoken does (checking up front would cost a UTF-8 copy of every text)."""
    try:
        return fn(*args)
    except UnicodeEncodeError:
        return _core_call(fn, *map(_without_surrogates, args))
    except ValueError as e:
        raise TokenizerError(str(e)) from None


def _without_surrogates(arg):
    if isinstance(arg, str):
        return arg.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(arg, list) and arg and isinstance(arg[0], str):
        return [_without_surrogates(a) for a in arg]
    return arg


class Tokenizer:
    """Byte-level BPE over a mergeable-ranks table (token bytes -> id), a split pattern and
    special tokens (string -> id). Construct it with `train`, `load`, `from_tiktoken_file` or
    `official`; the constructor takes the tables directly."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str,
                 special_tokens: dict[str, int] | None = None, name: str = "custom"):
        self.name = name
        self.pattern = _bpe.pattern_regex(pattern)
        self.mergeable_ranks = dict(mergeable_ranks)
        self._special_tokens = dict(special_tokens or {})
        self._core = _core_call(_bpe.Encoder, list(self.mergeable_ranks.items()),
                                list(self._special_tokens.items()), self.pattern)

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name!r}: {self.vocab_size} ids, {len(self._special_tokens)} special>"

    # ---------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str | None = None,
              special_tokens: Sequence[str] | None = None, *, name: str = "default",
              doc_cap: int = 0, max_chars: int = 0, chunk_chars: int = 16 << 20,
              progress: Callable[[int, int], None] | None = None) -> Tokenizer:
        """Train byte-level BPE on `texts` (any iterable of strings; it is streamed).

        vocab_size counts everything: 256 bytes + merges + special tokens (the chat tokens
        by default), which get the ids after the merges. pattern defaults to "nanochat" (GPT-4's
        split with numbers in runs of at most two digits); "cl100k", "o200k" or a regex also work.
        doc_cap keeps the first doc_cap characters of each text and max_chars stops after that
        many characters in all (0: no limit). Texts are counted chunk_chars at a time, so memory
        holds one chunk plus the counts of distinct pieces. progress(done, total) is called as
        merges are made. Ties between equally frequent pairs go to the smallest (left id,
        right id), so training is deterministic.
        """
        specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise TokenizerError(f"vocab_size {vocab_size} is too small: it must hold the 256 bytes and "
                                 f"{len(specials)} special tokens, so at least {256 + len(specials)}")
        counter = _core_call(_bpe.PieceCounter, pattern or "nanochat")
        batch, batch_chars, total = [], 0, 0
        for text in texts:
            if not isinstance(text, str):
                raise TokenizerError(f"training texts must be str, got {type(text).__name__}")
            if doc_cap:
                text = text[:doc_cap]
            if max_chars:
                text = text[:max_chars - total]
            batch.append(text)
            batch_chars += len(text)
            total += len(text)
            if batch_chars >= chunk_chars:
                _core_call(counter.add, batch)
                batch, batch_chars = [], 0
            if max_chars and total >= max_chars:
                break
        _core_call(counter.add, batch)
        trainer = counter.trainer()
        done = 0
        while done < n_merges:
            added = trainer.step(min(256, n_merges - done))
            if not added:
                break
            done += added
            if progress:
                progress(done, n_merges)
        if done < n_merges:
            warnings.warn(f"the training text only supports {done} merges, not {n_merges}: "
                          f"vocab_size is {256 + done + len(specials)}", stacklevel=2)
        vocab = trainer.vocab()
        ranks = {token: i for i, token in enumerate(vocab)}
        special_ids = {s: len(vocab) + i for i, s in enumerate(specials)}
        return cls(ranks, pattern or "nanochat", special_ids, name=name)

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike, pattern: str,
                           special_tokens: dict[str, int] | None = None, name: str | None = None) -> Tokenizer:
        """Load a tiktoken rank file (optionally gzipped). pattern is "cl100k", "o200k" or a
        regex; for "cl100k"/"o200k" the special tokens default to OpenAI's for that encoding."""
        path = Path(path)
        if special_tokens is None:
            official = next((o for o in OFFICIAL.values() if o["pattern"] == pattern), None)
            special_tokens = dict(official["special_tokens"]) if official else {}
        return cls(read_rank_file(path), pattern, special_tokens, name=name or path.name.split(".")[0])

    @classmethod
    def official(cls, name: Literal["cl100k_base", "o200k_base"]) -> Tokenizer:
        """OpenAI's cl100k_base or o200k_base, from the rank files the `bpe-openai` package
        ships (no network), checked against tiktoken's published SHA-256."""
        if name not in OFFICIAL:
            raise TokenizerError(f"unknown official encoding {name!r}; choose from {sorted(OFFICIAL)}")
        spec = importlib.util.find_spec("bpe_openai")
        if spec is None or not spec.submodule_search_locations:
            raise TokenizerError("the official rank files come with the bpe-openai package: uv sync")
        gz = Path(spec.submodule_search_locations[0]) / "data" / f"{name}.tiktoken.gz"
        raw = gzip.decompress(gz.read_bytes())
        digest = hashlib.sha256(raw).hexdigest()
        if digest != OFFICIAL[name]["sha256"]:
            raise TokenizerError(f"{gz} has SHA-256 {digest}, not the published {OFFICIAL[name]['sha256']}")
        info = OFFICIAL[name]
        return cls(parse_ranks(raw, str(gz)), info["pattern"], dict(info["special_tokens"]), name=name)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer saved by `save` (tokenizer.tiktoken + tokenizer.json)."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file() or not (directory / RANKS_FILE).is_file():
            raise TokenizerError(f"no tokenizer in {directory} (expected {RANKS_FILE} and {META_FILE}); "
                                 f"train one with `nanochat tokenizer train`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            pattern, specials = meta["pattern"], {str(k): int(v) for k, v in meta["special_tokens"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TokenizerError(f"{meta_path} is not a valid tokenizer description ({e!r}); "
                                 f"it needs \"pattern\" and \"special_tokens\"") from None
        return cls(read_rank_file(directory / RANKS_FILE), pattern, specials, name=meta.get("name", directory.name))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.tiktoken and tokenizer.json into `directory` (created if needed);
        each file is written to a temporary name and renamed, so a crash leaves no half file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        meta = {"name": self.name, "pattern": self.pattern, "special_tokens": self._special_tokens,
                "vocab_size": self.vocab_size}
        for filename, content in ((RANKS_FILE, ranks), (META_FILE, json.dumps(meta, indent=2) + "\n")):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
            os.replace(tmp, directory / filename)
        return directory

    def to_tiktoken(self):
        """A `tiktoken.Encoding` with the same ranks, pattern and special tokens."""
        import tiktoken

        return tiktoken.Encoding(self.name, pat_str=self.pattern, mergeable_ranks=self.mergeable_ranks,
                                 special_tokens=self._special_tokens)

    # ---------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids of the official encodings have gaps)."""
        return self._core.n_ids

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def special_id(self, token: str) -> int:
        try:
            return self._special_tokens[token]
        except KeyError:
            raise TokenizerError(f"{token!r} is not a special token of {self.name!r}; it has "
                                 f"{sorted(self._special_tokens)}") from None

    @property
    def bos_id(self) -> int:
        """`<|bos|>`, or `<|endoftext|>` for OpenAI's encodings: what separates documents."""
        for token in ("<|bos|>", "<|endoftext|>"):
            if token in self._special_tokens:
                return self._special_tokens[token]
        return self.special_id("<|bos|>")

    def token_bytes(self, token_id: int) -> bytes:
        b = self._core.token_bytes(token_id)
        if b is None:
            raise TokenizerError(f"{token_id} is not a token id of {self.name!r}")
        return b

    # ---------------------------------------------------------------------------------------
    # Encoding and decoding

    def _special_rules(self, allowed_special, disallowed_special) -> tuple[list[str] | None, list[str] | None]:
        """tiktoken's rules -> (allowed, disallowed) name lists for the core; None means all."""
        if allowed_special == "all":
            allowed = set(self._special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self._special_tokens)
            if unknown:
                raise TokenizerError(f"allowed_special has {sorted(unknown)}, which are not special tokens "
                                     f"of {self.name!r}")
        disallowed = set(self._special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        everything = set(self._special_tokens)
        return (None if allowed == everything else sorted(allowed),
                None if disallowed == everything else sorted(disallowed))

    def _check_disallowed(self, text: str, disallowed: list[str] | None) -> None:
        if disallowed == []:
            return
        found = _core_call(self._core.find_special, text, disallowed)
        if found is not None:
            raise DisallowedSpecialTokenError(
                f"the text contains the special token {found!r} at character {text.index(found)}. "
                f"Pass allowed_special={{{found!r}}} (or 'all') to encode it as that token, or "
                f"disallowed_special=() to encode it as ordinary text.")

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, with special-token strings encoded as ordinary text."""
        return _core_call(self._core.encode_ordinary, text)

    def encode(self, text: str, *, allowed_special: Literal["all"] | Collection[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Token ids of `text` with tiktoken's rules: special tokens in allowed_special become
        their ids; one in disallowed_special (by default every special token not allowed)
        raises DisallowedSpecialTokenError; any other is encoded as ordinary text."""
        allowed, disallowed = self._special_rules(allowed_special, disallowed_special)
        self._check_disallowed(text, disallowed)
        if allowed == []:
            return _core_call(self._core.encode_ordinary, text)
        return _core_call(self._core.encode, text, allowed)

    def _batch(self, method, texts, num_threads, allowed_special, disallowed_special):
        texts = list(texts)
        allowed, disallowed = self._special_rules(allowed_special, disallowed_special)
        for t in texts:
            self._check_disallowed(t, disallowed)
        return _core_call(method, texts, allowed, num_threads)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None, *,
                     allowed_special: Literal["all"] | Collection[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        """`encode` of each text, on num_threads threads (all cores if None), without the GIL."""
        return self._batch(self._core.encode_batch, texts, num_threads, allowed_special, disallowed_special)

    def encode_batch_numpy(self, texts: Sequence[str], num_threads: int | None = None, *,
                           allowed_special: Literal["all"] | Collection[str] = frozenset(),
                           disallowed_special: Literal["all"] | Collection[str] = "all"):
        """Like encode_batch, but returns (ids, offsets) numpy arrays, no Python lists: ids is
        uint32, text i is ids[offsets[i]:offsets[i + 1]]."""
        return self._batch(self._core.encode_batch_numpy, texts, num_threads, allowed_special, disallowed_special)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        try:
            return _core_call(self._core.decode_bytes, ids if isinstance(ids, list) else list(ids))
        except (TypeError, OverflowError):
            raise TokenizerError("token ids must be non-negative integers below 2**32") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def parse_ranks(data: bytes, where: str = "rank file") -> dict[bytes, int]:
    """Parse tiktoken's rank format: one `base64-token rank` per line."""
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{where}, line {lineno}: expected '<base64 token> <rank>', "
                                 f"got {line[:60]!r}") from None
    if not ranks:
        raise TokenizerError(f"{where} holds no tokens")
    return ranks


def read_rank_file(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file, gzipped or not."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read rank file {path}: {e.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return parse_ranks(data, str(path))
