import numpy as np
import torch

from nanochat.train.chat import ChatBatches


def conv(n, learn_from):
    ids = np.arange(100, 100 + n)
    mask = (np.arange(n) >= learn_from).astype(np.int64)
    return np.stack([ids, mask])


def test_packed_rows_are_full_and_only_assistant_tokens_are_targets():
    convs = [conv(7, 3), conv(5, 2), conv(9, 4), conv(11, 5)]
    batches = ChatBatches(convs, batch_size=2, seq_len=7, packed=True, device=torch.device("cpu"))
    stream = np.concatenate(convs, axis=1)
    assert len(batches) == 2  # 32 tokens -> 4 rows of 8 -> 2 batches of 2
    x, y = next(batches)
    assert x.shape == y.shape == (2, 7)
    row = stream[:, :8]
    assert torch.equal(x[0], torch.from_numpy(row[0, :-1]))
    expected_y = np.where(row[1, 1:] == 1, row[0, 1:], -1)  # target t+1 is learned iff the assistant wrote it
    assert torch.equal(y[0], torch.from_numpy(expected_y))


def test_padded_rows_hold_one_conversation_each_and_padding_is_never_a_target():
    convs = [conv(4, 2), conv(9, 3)]
    batches = ChatBatches(convs, batch_size=2, seq_len=16, packed=False, device=torch.device("cpu"))
    x, y = next(batches)
    assert x.shape == (2, 8)  # the longer conversation sets the width; the model processes the padding too
    assert (y[0, 3:] == -1).all()  # past the 4-token conversation: padding
    assert y[0, :3].tolist() == [-1, 102, 103]


def test_ranks_split_rows_and_resume_continues():
    convs = [conv(5, 1) for _ in range(12)]
    single = ChatBatches(convs, batch_size=4, seq_len=16, packed=False, device=torch.device("cpu"))
    ranks = [ChatBatches(convs, batch_size=2, seq_len=16, packed=False, device=torch.device("cpu"), rank=r,
                         world_size=2) for r in range(2)]
    whole = next(single)[0]
    assert torch.equal(torch.cat([next(ranks[0])[0], next(ranks[1])[0]]).sort(0).values, whole.sort(0).values)
    state = single.state_dict()
    expected = next(single)[0]
    resumed = ChatBatches(convs, batch_size=4, seq_len=16, packed=False, device=torch.device("cpu"))
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], expected)
