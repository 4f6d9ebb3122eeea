"""A byte-level stand-in for the BPE tokenizer (same interface the loader uses), so the data
tests do not depend on tokenizer training."""


class ByteTokenizer:
    bos_id = 256

    def encode_batch(self, texts, num_threads=None):
        return [list(t.encode("utf-8")) for t in texts]
