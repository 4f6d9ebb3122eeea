"""A byte-level stand-in for the BPE tokenizer (same interface the loader uses), so the data
tests do not depend on tokenizer training."""

import numpy as np


class ByteTokenizer:
    bos_id = 256

    def encode_batch_numpy(self, texts, num_threads=None, disallowed_special="all"):
        encoded = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        offsets = np.cumsum([0] + [len(e) for e in encoded])
        ids = np.concatenate(encoded).astype(np.uint32) if encoded else np.empty(0, np.uint32)
        return ids, offsets
