"""The engine: KV-cache generation equals a full recompute, tool calls are forced into the stream,
sampling (one shared `Sampling` or one per row) is seeded, and a reply's tokens read back as text
and chat-format parts (nanochat.chat_format) with nothing but the tokenizer."""


import subprocess
import sys

import pytest
import torch
from torch import nn

from nanochat.calculator import CalculatorError, calculate
from nanochat.chat_format import ReplyText, reply_parts, reply_text
from nanochat.config import ModelConfig
from nanochat.engine import ContinuousBatch, Engine, Sampling, sample
from nanochat.gpt import GPT
from nanochat.runtime import init_runtime
from nanochat.tokenizer import Tokenizer
from tests._chat_model import scripted_slot_cache

RT = init_runtime(device="cpu", dtype="float32")  # compared with plain fp32 forward passes


@pytest.fixture(scope="module")
def tok():
    text = "the cat sat on the mat. 2+3 is 5. café, naïve, über. " * 40
    return Tokenizer.train([text], 400)


class Scripted(nn.Module):
    """A stand-in model that writes a fixed script (one token per step, per row) and records what it
    is fed, to test the engine's control flow without a trained model."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.fed = script, vocab, []
        self.max_positions = 512
        self.produced = 0

    def new_kv_cache(self, batch, max_len, pad=None, dtype=None):
        return None

    def forward(self, idx, kv_cache=None, logits_at=None):
        self.fed.append(idx[0].tolist())
        logits = torch.full((idx.size(0), idx.size(1), self.vocab), -10.0)
        token = self.script[min(self.produced, len(self.script) - 1)]
        logits[:, :, token] = 10.0
        self.produced += 1
        return logits if logits_at is None else logits[:, logits_at]


@pytest.mark.parametrize("parts", [{"value_embeddings": False, "smear": False, "bigram_multiple": 0},
                                   {"value_embeddings": True, "x0_skip": True, "ve_gate": True}],
                         ids=["plain", "default+ve-gate+x0"])
def test_kv_cache_generation_equals_naive_recompute(tok, parts):
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, sequence_len=64, **parts), tok.vocab_size)
    if parts["value_embeddings"]:  # at init the optional parts are silent (zero projections, x0 weight 0): wake them up
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    engine = Engine(model, tok, RT)
    prompts = [tok.encode("the cat"), tok.encode("on the mat. 2"), [tok.bos_id]]
    got = engine.complete(prompts, Sampling(max_tokens=24))
    specials = set(tok.special_tokens.values())
    compared = 0
    for prompt, out in zip(prompts, got, strict=True):
        seq = list(prompt)
        for token in out:
            with torch.no_grad():
                expect = model(torch.tensor([seq]))[0, -1].argmax().item()  # full recompute, no cache
            assert token == expect
            compared += 1
            if token in specials:  # from here the engine's tool/stop rules take over
                break
            seq.append(token)
    assert compared >= 30


def test_tool_call_result_is_forced_into_the_stream(tok):
    sid = tok.special_id
    call = tok.encode_ordinary("2+3")
    script = [sid("<|python_start|>"), *call, sid("<|python_end|>")]
    after = tok.encode_ordinary(" so 5")
    n_forced = 2 + len(tok.encode_ordinary("5"))
    script += [0] * n_forced + after + [sid("<|assistant_end|>")]  # what the model "wants" while forced is ignored
    model = Scripted(script, tok.vocab_size)
    out = Engine(model, tok, RT).complete([[tok.bos_id]], Sampling(max_tokens=40))[0]
    forced = [sid("<|output_start|>"), *tok.encode_ordinary("5"), sid("<|output_end|>")]
    expect = [sid("<|python_start|>"), *call, sid("<|python_end|>"), *forced, *after, sid("<|assistant_end|>")]
    assert out == expect
    fed = [step[0] for step in model.fed[1:]]  # after the prompt, the model is fed each chosen token
    assert fed == expect[:-1]
    # a rollout gives the same tokens and marks the forced ones: what RL must not credit to the model
    ((tokens, chosen),) = Engine(Scripted(script, tok.vocab_size), tok, RT).rollout([[tok.bos_id]],
                                                                                     Sampling(max_tokens=40))
    assert tokens == expect
    assert chosen == [True] * (len(call) + 2) + [False] * len(forced) + [True] * (len(after) + 1)


def test_calculator_errors_become_tool_output_not_crashes(tok):
    sid = tok.special_id
    script = [sid("<|python_start|>"), *tok.encode_ordinary("2+"), sid("<|python_end|>")] + [0] * 60
    out = Engine(Scripted(script, tok.vocab_size), tok, RT).complete([[tok.bos_id]], Sampling(max_tokens=40))[0]
    text = tok.decode(out)
    assert "<|output_start|>error: cannot parse" in text


def test_streaming_never_splits_a_utf8_character(tok):
    e_acute = list("é".encode())  # two byte tokens: 0xC3, 0xA9
    script = [e_acute[0], e_acute[1], *tok.encode_ordinary("!"), tok.special_id("<|assistant_end|>")]
    pieces = list(Engine(Scripted(script, tok.vocab_size), tok, RT).stream_text([tok.bos_id], Sampling(max_tokens=10)))
    assert "".join(pieces) == "é!"
    assert all("\ufffd" not in p for p in pieces)


def test_sampling_is_seeded_and_top_p_restricts():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    u = lambda n, s: torch.rand(n, generator=torch.Generator().manual_seed(s))  # noqa: E731
    warm = Sampling(temperature=1.0)
    assert torch.equal(sample(logits.expand(200, 4), warm, u(200, 1)), sample(logits.expand(200, 4), warm, u(200, 1)))
    nucleus = sample(logits.expand(500, 4), Sampling(temperature=1.0, top_p=0.7), u(500, 2))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    assert set(sample(logits.expand(500, 4), Sampling(temperature=1.0, top_k=1), u(500, 3)).tolist()) == {0}
    assert sample(logits, Sampling(temperature=0.0), u(1, 0)).item() == 0
    # draws at the very ends of [0, 1) land on the first and the last token kept
    assert sample(logits.expand(2, 4), Sampling(temperature=1.0, top_k=3), torch.tensor([0.0, 1 - 1e-9])).tolist() \
        == [0, 2]
    # nothing restricted: the vocabulary's order, unsorted; a draw rounded onto the total (here 1.0) still
    # lands on a token that has a chance, not on the impossible last one
    no_last = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]])
    assert sample(no_last.expand(2, 4), Sampling(temperature=1.0), torch.tensor([0.0, 1.0])).tolist() == [0, 2]


@pytest.mark.parametrize("settings, expected", [
    (Sampling(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
    (Sampling(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0]),
    (Sampling(temperature=1.0, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (Sampling(temperature=2.0), None),  # p ** (1 / 2), renormalised
])
def test_sampled_tokens_follow_the_restricted_distribution(settings, expected):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    if expected is None:
        expected = (probs.sqrt() / probs.sqrt().sum()).tolist()
    n = 40_000
    draws = torch.rand(n, generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(sample(probs.log().expand(n, 4), settings, draws), minlength=4).double() / n
    expected = torch.tensor(expected, dtype=torch.float64)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts - expected).abs() <= 4 * sigma + 1e-12).all(), (counts, expected)


def test_each_row_samples_with_its_own_settings_as_if_alone():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3
    settings = [Sampling(temperature=0.0), Sampling(temperature=0.7, top_k=5), Sampling(temperature=1.3),
                Sampling(temperature=1.0, top_p=0.5), Sampling(temperature=0.9, top_k=3, top_p=0.8),
                Sampling(temperature=0.0, top_k=2)]
    draws = torch.rand(6, generator=torch.Generator().manual_seed(4))
    together = sample(logits, settings, draws).tolist()
    assert together == [sample(logits[i:i + 1], settings[i], draws[i:i + 1]).item() for i in range(6)]
    assert together[0] == logits[0].argmax() and together[5] == logits[5].argmax()
    assert together[1] in logits[1].topk(5).indices.tolist() and together[4] in logits[4].topk(3).indices.tolist()


@pytest.mark.parametrize("expr", ["__import__('os').system('ls')", "(1).__class__", "open('x')", "9**9**9",
                                  "2**1000", "-" * 50 + "1", "(1+" * 40 + "1" + ")" * 40, "x+1", "lambda: 1", "[1,2]",
                                  "1" * 300])
def test_calculator_refuses_injection_and_runaway_expressions(expr):
    with pytest.raises(CalculatorError):
        calculate(expr)


def test_a_refused_expression_raises_without_a_python_warning():
    # Python warns at compile time about `2or 3` ("invalid decimal literal"); the model writes such
    # things, and a warning on stderr for them would litter a run's log.
    code = ("from nanochat.calculator import calculate\n"
            "try:\n    calculate('2or 3')\nexcept Exception as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("not plain arithmetic") and proc.stderr == "", proc.stderr


def test_calculator_time_limit(monkeypatch):
    import nanochat.calculator as calc

    monkeypatch.setattr(calc, "TIME_LIMIT_S", -1.0)  # every expression is already past its deadline
    with pytest.raises(CalculatorError, match="longer than"):
        calculate("1+1")
    monkeypatch.undo()
    assert calculate("(2+3)*4") == "20"


def test_reply_stream_shows_tool_calls_readably_and_reports_why_it_ended(tok):
    sid = tok.special_id
    script = [*tok.encode_ordinary("it is "), sid("<|python_start|>"), *tok.encode_ordinary("2+3"),
              sid("<|python_end|>")]
    script += [0] * (2 + len(tok.encode_ordinary("5"))) + tok.encode_ordinary(".") + [sid("<|assistant_end|>")]
    stream = Engine(Scripted(script, tok.vocab_size), tok, RT).stream_text([tok.bos_id], Sampling(max_tokens=40))
    assert "".join(stream) == "it is [2+3 = 5]."
    assert stream.finish_reason == "stop" and stream.tokens[-1] == sid("<|assistant_end|>")
    assert len(stream.tokens) == len(script)  # every generated token counts, the forced ones too

    # As the chat data writes it, with nothing between the words and the call: a space is put in.
    glued = [*tok.encode_ordinary("Let me see."), sid("<|python_start|>"), *tok.encode_ordinary("6*7"),
             sid("<|python_end|>")]
    glued += [0] * (2 + len(tok.encode_ordinary("42"))) + tok.encode_ordinary("So 42.") + [sid("<|assistant_end|>")]
    stream = Engine(Scripted(glued, tok.vocab_size), tok, RT).stream_text([tok.bos_id], Sampling(max_tokens=40))
    assert "".join(stream) == "Let me see. [6*7 = 42] So 42."

    cut = Engine(Scripted(tok.encode_ordinary("the cat sat"), tok.vocab_size), tok, RT).stream_text(
        [tok.bos_id], Sampling(max_tokens=3))
    assert len("".join(cut)) > 0 and cut.finish_reason == "length" and len(cut.tokens) == 3


def test_per_row_sampling_does_not_depend_on_the_rest_of_the_batch(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, sequence_len=64), tok.vocab_size)
    engine = Engine(model, tok, RT)
    a, b = tok.encode("the cat"), tok.encode("on the mat. 2+3 is")
    sa = Sampling(max_tokens=12, temperature=1.0, top_k=50, seed=7)
    sb = Sampling(max_tokens=5, temperature=0.0)
    together = engine.complete([a, b], [sa, sb])
    assert len(together[0]) <= 12 and len(together[1]) <= 5
    alone_a = engine.complete([a], [sa])[0]
    alone_b = engine.complete([b], Sampling(max_tokens=5))[0]
    assert together == [alone_a, alone_b]  # the same tokens with or without a neighbour in the batch
    other_seed = engine.complete([a], [Sampling(max_tokens=12, temperature=1.0, top_k=50, seed=8)])[0]
    assert other_seed != alone_a
    with pytest.raises(ValueError, match="2 sampling settings for 1 prompts"):
        engine.complete([a], [sa, sb])


def test_one_sampling_shares_one_random_stream_and_a_list_gives_each_row_its_own(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, sequence_len=64), tok.vocab_size)
    engine = Engine(model, tok, RT)
    prompt, hot = tok.encode("the cat"), Sampling(max_tokens=16, temperature=1.5, seed=3)
    shared = engine.complete([prompt] * 3, hot)
    own = engine.complete([prompt] * 3, [hot] * 3)
    assert len(set(map(tuple, shared))) > 1  # one stream: the rows draw different tokens
    assert own == [own[0]] * 3 == [engine.complete([prompt], hot)[0]] * 3  # one stream each, all seeded alike
    model.train()
    engine.complete([prompt], Sampling(max_tokens=2))
    assert model.training  # generation runs in eval mode and gives the model back as it was


def test_reply_parsing_needs_only_the_tokenizer(tok):
    sid = tok.special_id
    reply = [*tok.encode_ordinary("it is "), sid("<|python_start|>"), *tok.encode_ordinary("2+3"),
             sid("<|python_end|>"), sid("<|output_start|>"), *tok.encode_ordinary("5"), sid("<|output_end|>"),
             *tok.encode_ordinary("."), sid("<|assistant_end|>")]
    assert reply_parts(tok, reply) == [{"type": "text", "text": "it is "}, {"type": "python", "text": "2+3"},
                                       {"type": "python_output", "text": "5"}, {"type": "text", "text": "."}]
    text = ReplyText(tok)
    assert "".join(text.feed(t) for t in reply) == "it is [2+3 = 5]." and text.finish_reason == "stop"
    words = tok.encode_ordinary("the cat")
    assert reply_text(tok, [*words, sid("<|assistant_end|>")]) == reply_text(tok, words) == "the cat"
    assert reply_text(tok, [*words, tok.bos_id]) == "the cat"


def test_bf16_training_step_and_generation_as_on_cuda(tok, monkeypatch):
    """CUDA's dtypes on the CPU: bf16 autocast through a compiled training step (Muon orthogonalising
    in bf16, the chunked loss as d20 uses it) and then a generation with a bf16 KV cache, so that a
    dtype mismatch fails here rather than first on a GPU."""
    from nanochat import gpt as gpt_module
    from nanochat.config import OptimConfig
    from nanochat.optim import build_optimizer
    from nanochat.train.loop import train_step

    rt = init_runtime(device="cpu", dtype="bfloat16")
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=32), tok.vocab_size)
    opt = build_optimizer(model, OptimConfig(), total_batch_tokens=4 * 32)
    for group in opt.optimizers[0].param_groups:
        group["ns_dtype"] = "bfloat16"  # what CUDA uses
    monkeypatch.setattr(gpt_module, "LOSS_CHUNK_ELEMENTS", 40 * tok.vocab_size)  # 128 rows in 4 chunks
    before = [p.detach().clone() for p in model.parameters()]
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the second step moves the matrices behind the zero-initialised projections too
        x = torch.randint(0, tok.vocab_size, (4, 33))
        loss, count = train_step(compiled, opt, iter([(x[:, :-1], x[:, 1:])]), 1, rt)
    assert count == 128 and 0 < loss < 2 * torch.log(torch.tensor(tok.vocab_size)).item()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)) > len(before) // 2
    reply = Engine(model, tok, rt).complete([tok.encode_ordinary("the cat"), [tok.bos_id]], Sampling(max_tokens=8))
    assert [len(r) for r in reply] == [8, 8] and all(0 <= t < tok.vocab_size for r in reply for t in r)


def drive(batch: ContinuousBatch, prompts, settings, admit_every: int) -> tuple[list[list[int]], list[int]]:
    """Feed the requests into `batch` one every `admit_every` steps (as slots allow); returns each
    request's tokens and the number of sequences running at each step."""
    out, slot_of, waiting, running, step = [[] for _ in prompts], {}, list(range(len(prompts))), [], 0
    while waiting or batch.running:
        if waiting and batch.free and (step % admit_every == 0 or not batch.running):
            i = waiting.pop(0)
            slot_of[batch.admit(prompts[i], settings[i])[0]] = i
        running.append(batch.running)
        for slot, token, _ in batch.step():
            out[slot_of[slot]].append(token)
        step += 1
    return out, running


@pytest.mark.parametrize("parts", [{}, {"n_kv_head": 1, "ve_gate": True, "x0_skip": True}],
                         ids=["default", "gqa+gates"])
def test_continuous_batching_gives_each_request_its_reply_alone(tok, parts):
    """Requests join a running batch at different steps, more of them than there are slots, each
    with its own length, budget and sampling: every reply is what Engine.generate writes for it alone."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, sequence_len=64, **parts), tok.vocab_size)
    with torch.no_grad():  # wake up the parts that start silent (zero projections, smear and bigram gates)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine = Engine(model, tok, RT)
    texts = ["the cat", "on the mat. 2+3 is", "café", "the cat sat on the mat. the cat sat", "naïve über"]
    prompts = [[tok.bos_id, *tok.encode_ordinary(t)] for t in texts] * 2
    settings = [Sampling(max_tokens=6 + 3 * i, temperature=0.0 if i % 3 == 0 else 0.9, top_k=None if i % 2 else 20,
                         seed=i) for i in range(len(prompts))]
    alone = [engine.complete([p], s)[0] for p, s in zip(prompts, settings, strict=True)]
    together, running = drive(ContinuousBatch(engine, slots=3), prompts, settings, admit_every=2)
    assert together == alone
    assert max(running) == 3 and running[0] == 1  # the slots filled up as requests came, and were reused
    # several admitted at once share one (left-padded) prefill, and still write their own replies
    batch = ContinuousBatch(engine, slots=len(prompts))
    slots = batch.admit_many([(p, s, 1) for p, s in zip(prompts, settings, strict=True)])
    got = {slot: [] for (slot,) in slots}
    while batch.running:
        for slot, token, _ in batch.step():
            got[slot].append(token)
    assert [got[slot] for (slot,) in slots] == alone


def test_continuous_batch_forces_tool_results_and_frees_finished_slots(tok):
    sid = tok.special_id
    call = tok.encode_ordinary("2+3")
    script = [sid("<|python_start|>"), *call, sid("<|python_end|>"), 0, 0, 0, 0, sid("<|assistant_end|>")]

    class Stand(Scripted):  # the same script for every row, one token per forward pass
        new_slot_cache = staticmethod(scripted_slot_cache)

    batch = ContinuousBatch(Engine(Stand(script, tok.vocab_size), tok, RT), slots=2)
    (slot,) = batch.admit([tok.bos_id], Sampling(max_tokens=40))
    tokens = []
    while batch.running:
        tokens += [token for _, token, _ in batch.step()]
    forced = [sid("<|output_start|>"), *tok.encode_ordinary("5"), sid("<|output_end|>")]
    assert tokens[:len(call) + 2 + len(forced)] == [sid("<|python_start|>"), *call, sid("<|python_end|>"), *forced]
    assert batch.free == 2 and slot == 0
    with pytest.raises(ValueError, match="exceeds"):
        batch.admit([tok.bos_id] * 500, Sampling(max_tokens=40))
