"""A tiny, slow, obviously-correct byte-level BPE: the reference the Rust trainer must equal.

Independent of the Rust core: pre-tokenization uses the `regex` module (tiktoken's own
dependency), and pair counts are recomputed from scratch at every step.
"""

from collections import Counter
from itertools import pairwise

import regex


def train(texts, n_merges, pattern):
    """Token byte strings by id: the 256 single bytes, then one per merge.

    Each step merges the most frequent adjacent pair, ties going to the smallest
    (left id, right id). A pair whose bytes are already a token merges into that token
    without a new id (the vocabulary must stay a set of distinct byte strings).
    """
    pieces = Counter(m.group() for text in texts for m in regex.finditer(pattern, text))
    words = [[list(p.encode("utf-8")), n] for p, n in pieces.items()]
    vocab = [bytes([b]) for b in range(256)]
    ids = {t: i for i, t in enumerate(vocab)}
    added = 0
    while added < n_merges:
        counts = Counter()
        for word, n in words:
            for pair in pairwise(word):
                counts[pair] += n
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        token = vocab[a] + vocab[b]
        if token not in ids:
            ids[token] = len(vocab)
            vocab.append(token)
            added += 1
        new = ids[token]
        for entry in words:
            word, out, i = entry[0], [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            entry[0] = out
    return vocab
