import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _fake_tokenizer import ByteTokenizer

from nanochat.data.loader import DataLoader
from nanochat.data.sources import DataError, folder_source

BOS = ByteTokenizer.bos_id


def make_corpus(folder: Path, n_docs=300, seed=0) -> list[str]:
    rng = random.Random(seed)
    docs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 90))) for _ in range(n_docs)]
    per_file = n_docs // 5
    for i in range(5):
        part = docs[i * per_file:(i + 1) * per_file]
        pq.write_table(pa.table({"text": part}), folder / f"{'abcde'[i]}.parquet", row_group_size=16)
    pq.write_table(pa.table({"text": ["held out"] * 5}), folder / "z.parquet")
    return docs


def loader(folder, **kw):
    args = dict(batch_size=4, seq_len=32, buffer_docs=16)
    args.update(kw)
    return DataLoader(folder_source(folder), ByteTokenizer(), **args)


def test_rows_are_bos_aligned_unpadded_pieces_of_documents(tmp_path):
    docs = make_corpus(tmp_path)
    encoded = {tuple([BOS, *d.encode()]) for d in docs}
    dl = loader(tmp_path)
    for _ in range(30):
        x, y = next(dl)
        assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows = torch.cat([x, y[:, -1:]], dim=1)
        for row in rows.tolist():
            assert row[0] == BOS  # every row starts at a document start
            starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
            for piece in pieces[:-1]:
                assert piece in encoded  # whole documents...
            assert any(d[: len(pieces[-1])] == pieces[-1] for d in encoded)  # ...and at most one cropped
    assert 0 < dl.cropped_fraction < 0.5
    dl.close()


def test_resume_yields_the_same_next_batches(tmp_path):
    make_corpus(tmp_path)
    dl = loader(tmp_path, prefetch=3)
    for _ in range(7):
        next(dl)
    state = dl.state_dict()  # the thread has already run ahead; the state must not
    expected = [next(dl)[0] for _ in range(40)]  # crosses an epoch boundary
    dl.close()
    resumed = loader(tmp_path, prefetch=1)
    resumed.load_state_dict(state)
    got = [next(resumed)[0] for _ in range(40)]
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_deterministic_for_a_seed(tmp_path):
    make_corpus(tmp_path)
    runs = []
    for seed in (1, 1, 2):
        dl = loader(tmp_path, seed=seed)
        runs.append(torch.cat([next(dl)[0] for _ in range(40)]))
        dl.close()
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the file order depends on the seed


def test_validation_split_is_one_pass(tmp_path):
    make_corpus(tmp_path)
    dl = loader(tmp_path, split="val", batch_size=1, seq_len=8)
    batches = list(dl)
    assert len(batches) == 5  # 5 docs of 9 tokens each -> 5 rows of 9
    assert all(b[0][0, 0].item() == BOS for b in batches)


def test_errors_reach_the_consumer(tmp_path):
    make_corpus(tmp_path)
    for name in "abcde":
        (tmp_path / f"{name}.parquet").write_bytes(b"garbage")
    dl = loader(tmp_path)
    with pytest.raises(DataError, match=r"[a-e]\.parquet is not a readable parquet file"):
        next(dl)


def test_two_ranks_under_torchrun_split_the_single_rank_stream(tmp_path):
    make_corpus(tmp_path)
    worker = Path(__file__).with_name("_dist_loader_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = loader(tmp_path, batch_size=2, seq_len=32, buffer_docs=8)
    for step in range(3):
        # one step of 2 ranks x 2 rows == one process's next 4 rows, interleaved by row number
        rows = torch.cat([next(single)[0], next(single)[0]])
        assert torch.equal(ranks[0][step], rows[0::2])
        assert torch.equal(ranks[1][step], rows[1::2])
    single.close()


def test_real_tokenizer_and_special_token_text(tmp_path):
    """With the Rust BPE tokenizer: documents that contain special-token strings are plain text."""
    from nanochat.tokenizer import Tokenizer

    docs = make_corpus(tmp_path)
    tok = Tokenizer.train(docs, 300)
    pq.write_table(pa.table({"text": ["talk about <|bos|> and <|user_start|> markers"] * 50}), tmp_path / "a.parquet")
    dl = DataLoader(folder_source(tmp_path), tok, batch_size=4, seq_len=32, buffer_docs=16)
    rows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in (next(dl) for _ in range(40))])
    dl.close()
    assert (rows[:, 0] == tok.bos_id).all()
    specials = set(tok.special_tokens.values())
    assert set(rows.flatten().tolist()) & specials == {tok.bos_id}  # no other special id was produced
