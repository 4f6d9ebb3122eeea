"""The training data loader: documents in, packed (x, y) token batches out, in the background.

Packing. Every document becomes `[BOS] + tokens`. Rows hold T+1 tokens (x = row[:-1],
y = row[1:]) and always *start at a document start*: a row is filled best-fit from a buffer of
tokenized documents — repeatedly the longest document that still fits — and when none fits,
the shortest one is cropped to fill the row exactly. A document longer than a whole row loses
its tail whatever we do, so it gets a row to itself (cropping it into a partly filled row would
waste more). No padding, every row BOS-aligned; the price is the cropped tails, reported as
`cropped_fraction`.

Determinism and resume. The stream of rows depends only on the data, the tokenizer and the seed.
The loader's state (read position + the buffered documents) travels with every batch, so
`state_dict()` describes exactly the batches consumed so far, however far the background thread
has run ahead; loading it yields the same next batches an uninterrupted run would have seen.

Distribution. Rows are numbered globally and rank r takes rows r, r+W, r+2W, … . The global
stream is therefore the same for 1 or W ranks: one step of W ranks × B rows consumes exactly
the rows that one process would consume in W micro-steps of B. Each rank tokenizes the whole
stream to get there; with the Rust batch encoder that costs a fraction of a core per rank.

Background. A thread tokenizes (the Rust encoder releases the GIL), packs and, on CUDA, copies
batches into pinned memory, keeping a bounded queue ready; the training step only does a
non-blocking host-to-device copy.
"""

from __future__ import annotations

import bisect
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from nanochat.data.sources import DataSource, Split


@dataclass
class _Position:
    epoch: int = 0
    file: int = 0
    unit: int = 0
    doc: int = 0


@dataclass
class _PackState:
    pos: _Position = field(default_factory=_Position)
    keys: list = field(default_factory=list)  # sorted (length, seq) of buffered documents
    docs: list = field(default_factory=list)  # token arrays, parallel to keys
    seq: int = 0  # documents read so far (tie-break for equal lengths)
    rows: int = 0  # global rows produced so far
    tokens: int = 0  # document tokens taken into rows or cropped
    cropped: int = 0

    def copy(self) -> _PackState:
        return _PackState(_Position(**vars(self.pos)), list(self.keys), list(self.docs), self.seq, self.rows,
                          self.tokens, self.cropped)


class _Packer:
    """Single-threaded core: reads, tokenizes and packs rows. Not thread-safe; the loader's
    background thread owns it."""

    def __init__(self, source: DataSource, tokenizer, split: Split, row_len: int, buffer_docs: int,
                 seed: int, loop: bool, num_threads: int | None):
        self.source, self.tokenizer, self.split = source, tokenizer, split
        self.row_len, self.buffer_docs, self.seed, self.loop = row_len, buffer_docs, seed, loop
        self.num_threads = num_threads
        self.bos = tokenizer.bos_id
        self.state = _PackState()
        self._docs: Iterator[np.ndarray] | None = None
        self._exhausted = False

    def reset(self, state: _PackState) -> None:
        self.state = state
        self._docs, self._exhausted = None, False

    def _file_order(self, epoch: int) -> list:
        files = list(self.source.files(self.split))
        if self.split == "train":
            random.Random(self.seed * 100_003 + epoch).shuffle(files)
        return files

    def _read(self) -> Iterator[np.ndarray]:
        """Tokenized documents from the current position on, advancing it as they are taken."""
        pos = self.state.pos
        while True:
            files = self._file_order(pos.epoch)
            if not files:
                raise ValueError(f"the {self.split} split of {self.source.name} has no files")
            while pos.file < len(files):
                for texts in self.source.units(files[pos.file], start=pos.unit):
                    # A document that happens to contain "<|bos|>" is text, not a control token.
                    ids, offsets = self.tokenizer.encode_batch_numpy(texts[pos.doc:], num_threads=self.num_threads,
                                                                     disallowed_special=())
                    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
                        pos.doc += 1
                        doc = np.empty(end - start + 1, dtype=np.int32)
                        doc[0] = self.bos
                        doc[1:] = ids[start:end]
                        yield doc
                    pos.unit, pos.doc = pos.unit + 1, 0
                pos.file, pos.unit = pos.file + 1, 0
            if not self.loop:
                return
            pos.epoch, pos.file = pos.epoch + 1, 0

    def _fill(self) -> None:
        st = self.state
        if self._docs is None:
            self._docs = self._read()
        while not self._exhausted and len(st.keys) < self.buffer_docs:
            doc = next(self._docs, None)
            if doc is None:
                self._exhausted = True
                break
            key = (len(doc), st.seq)
            st.seq += 1
            i = bisect.bisect(st.keys, key)
            st.keys.insert(i, key)
            st.docs.insert(i, doc)

    def next_row(self) -> np.ndarray | None:
        """The next packed row of row_len tokens, or None at the end of a non-looping split."""
        st = self.state
        self._fill()
        if not st.keys:
            return None
        row = np.empty(self.row_len, dtype=np.int32)
        filled = 0
        while filled < self.row_len:
            self._fill()
            if not st.keys:  # data ran out mid-row: end the stream here (the partial row is dropped)
                return None
            room = self.row_len - filled
            if filled == 0 and st.keys[-1][0] > room:
                i = len(st.keys) - 1  # a document longer than a row is cropped anyway: let it fill a row alone
            else:
                i = bisect.bisect(st.keys, (room, float("inf"))) - 1  # the longest that fits
                if i < 0:
                    i = 0  # none fits: crop the shortest, which wastes least
            take_whole = st.keys[i][0] <= room
            st.keys.pop(i)
            doc = st.docs.pop(i)
            n = len(doc) if take_whole else room
            row[filled:filled + n] = doc[:n]
            filled += n
            st.tokens += len(doc)
            st.cropped += len(doc) - n
        st.rows += 1
        return row


class DataLoader:
    """Iterator of (x, y) int64 batches of shape (batch_size, seq_len) on `device`.

    `split="train"` loops over the data forever (epochs); `"val"` makes one pass and stops.
    """

    def __init__(self, source: DataSource, tokenizer, batch_size: int, seq_len: int, split: Split = "train",
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 buffer_docs: int = 1000, prefetch: int = 4, num_threads: int | None = None):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError("batch_size and seq_len must be positive")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.packer = _Packer(source, tokenizer, split, seq_len + 1, buffer_docs, seed, split == "train",
                              num_threads)
        self._state = self.packer.state.copy()  # state after the last batch handed out
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self.wait_seconds = 0.0  # time the consumer spent blocked on the queue

    # -- the background thread -----------------------------------------------------------

    def _batch(self) -> torch.Tensor | None:
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int32)
        got = 0
        while got < self.batch_size:
            mine = self.packer.state.rows % self.world_size == self.rank
            row = self.packer.next_row()
            if row is None:
                return None
            if mine:
                rows[got] = row
                got += 1
        batch = torch.from_numpy(rows).long()
        return batch.pin_memory() if self.device.type == "cuda" else batch

    @staticmethod
    def _put(q: queue.Queue, stop: threading.Event, item) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = self._batch()
                self._put(q, stop, (batch, self.packer.state.copy()))
                if batch is None:
                    return
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._put(q, stop, (e, None))

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True,
                                        name="nanochat-loader")
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # -- the consumer side ---------------------------------------------------------------

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        batch, state = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(batch, BaseException):
            self.close()
            raise batch
        if batch is None:
            self.close()
            raise StopIteration
        self._state = state
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    @property
    def cropped_fraction(self) -> float:
        return self._state.cropped / max(self._state.tokens, 1)

    def state_dict(self) -> dict:
        st = self._state
        return {
            "position": [st.pos.epoch, st.pos.file, st.pos.unit, st.pos.doc],
            "counters": [st.seq, st.rows, st.tokens, st.cropped],
            "buffer_keys": torch.tensor(st.keys, dtype=torch.int64).reshape(-1, 2),
            "buffer_tokens": torch.from_numpy(np.concatenate(st.docs) if st.docs else np.empty(0, np.int32)),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.close()
        keys = [tuple(k) for k in sd["buffer_keys"].tolist()]
        tokens = sd["buffer_tokens"].numpy()
        bounds = np.cumsum([0] + [k[0] for k in keys])
        docs = [tokens[bounds[i]:bounds[i + 1]].copy() for i in range(len(keys))]
        seq, rows, n_tokens, cropped = sd["counters"]
        state = _PackState(_Position(*sd["position"]), keys, docs, seq, rows, n_tokens, cropped)
        self.packer.reset(state.copy())
        self._state = state
