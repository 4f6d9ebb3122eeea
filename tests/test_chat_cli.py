"""`nanochat chat`: the one-shot mode on a real (untrained) model loaded from a run, and the
interactive loop driven through stdin with a stand-in model whose replies are fixed, so that what
each turn sends the model can be checked token for token."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nanochat import chat
from nanochat.chat_format import render_for_completion
from nanochat.cli import main
from nanochat.config import DeviceConfig, ModelSource
from nanochat.engine import Engine, Sampling, load_engine
from nanochat.runtime import init_runtime
from nanochat.tokenizer import Tokenizer
from tests._chat_model import TEXT, chat_model_home

RT = init_runtime(device="cpu")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 300)


class Parrot(nn.Module):
    """A stand-in model whose n-th reply is the token script `scripts[n]` (one token per step),
    and which records the prompt of every reply it is asked for. `context` is its length limit."""

    def __init__(self, scripts: list[list[int]], vocab: int, context: int = 512, interrupt_at: int = -1):
        super().__init__()
        self.scripts, self.vocab, self.interrupt_at = scripts, vocab, interrupt_at
        self.max_positions = context
        self.prompts: list[list[int]] = []

    def new_kv_cache(self, batch, max_len, pad=None, dtype=None):
        self.step = 0  # a new generation starts
        return None

    def forward(self, idx, kv_cache=None):
        if self.step == 0:
            self.prompts.append(idx[0].tolist())
        elif len(self.prompts) - 1 == self.interrupt_at:
            raise KeyboardInterrupt  # as if Ctrl-C were pressed while this reply is written
        script = self.scripts[(len(self.prompts) - 1) % len(self.scripts)]
        logits = torch.full((idx.size(0), idx.size(1), self.vocab), float("-inf"))
        logits[:, -1, script[min(self.step, len(script) - 1)]] = 0.0
        self.step += 1
        return logits


class Recording(Engine):
    """An engine that notes the sampling settings of every reply."""

    settings: list[Sampling]

    def stream_text(self, prompt, sampling):
        self.settings.append(sampling)
        return super().stream_text(prompt, sampling)


def says(tok, text: str) -> list[int]:
    return tok.encode_ordinary(text) + [tok.special_id("<|assistant_end|>")]


@pytest.fixture
def parrot(tok, monkeypatch):
    """`parrot(...)` makes `nanochat chat` talk to a new Parrot (by default answering "Hi there.",
    then "The cat sat.", in turn) and returns (model, engine)."""

    def make(scripts=None, context=512, interrupt_at=-1):
        scripts = scripts or [says(tok, "Hi there."), says(tok, "The cat sat.")]
        engine = Recording(Parrot(scripts, tok.vocab_size, context, interrupt_at), tok, RT)
        engine.settings = []
        monkeypatch.setattr(chat, "load_engine", lambda source, rt: (engine, "parrot@1"))
        return engine.model, engine

    return make


def run_chat(monkeypatch, capsys, lines: list[str], *args: str) -> tuple[int, str, str]:
    """`nanochat chat` with `lines` typed on stdin; (exit code, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", "--device", "cpu", "--max-tokens", "32", *args])
    out, err = capsys.readouterr()
    return code, out, err


def user_turn(tok, text: str) -> list[int]:
    return [tok.special_id("<|user_start|>"), *tok.encode_ordinary(text), tok.special_id("<|user_end|>")]


# ---------------------------------------------------------------------------------------------
# One-shot mode, on a real model loaded from a run


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return chat_model_home(tmp_path_factory)


def test_one_shot_prints_the_reply_and_nothing_else(home, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(home))
    engine, _ = load_engine(ModelSource(run="t", runtime=DeviceConfig(device="cpu")), RT)
    prompt = render_for_completion(engine.tok, [{"role": "user", "content": "Hello there!"}])
    expect = "".join(engine.stream_text(prompt, Sampling(max_tokens=24, temperature=0.0)))
    assert expect.strip()

    code = main(["chat", "--run", "t", "--device", "cpu", "--temperature", "0", "--max-tokens", "24",
                 "-p", "Hello there!"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == expect + "\n"
    assert "Traceback" not in err


def test_one_shot_reads_the_prompt_from_stdin_and_sends_the_system_message(parrot, tok, monkeypatch, capsys):
    model, engine = parrot()
    code, out, err = run_chat(monkeypatch, capsys, ["What is", "a cat?"], "-p", "-", "--system", "Be brief.",
                              "--seed", "7", "--temperature", "0.9", "--top-k", "0")
    assert (code, out, err) == (0, "Hi there.\n", "")
    assert model.prompts == [render_for_completion(tok, [{"role": "user", "content": "Be brief.\n\nWhat is\na cat?"}])]
    assert engine.settings == [Sampling(max_tokens=32, temperature=0.9, top_k=None, seed=7)]


def test_one_shot_says_when_the_reply_is_cut_off(parrot, tok, monkeypatch, capsys):
    parrot(scripts=[tok.encode_ordinary("and on and on and on")])  # never closes its turn
    code, out, err = run_chat(monkeypatch, capsys, [], "-p", "Talk.", "--max-tokens", "3")
    assert code == 0
    assert out == tok.decode(tok.encode_ordinary("and on and on and on")[:3]) + "\n"
    assert "cut off at 3 tokens: --max-tokens" in err


def test_missing_run_is_a_clear_error_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    assert main(["chat", "--run", "nope", "--device", "cpu", "-p", "hi"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "run 'nope' has no rl / sft / mid / base model" in err
    assert "Traceback" not in err


def test_max_tokens_beyond_the_context_is_bounded_by_it(parrot, tok, monkeypatch, capsys):
    words = tok.encode_ordinary("and on " * 40)  # never closes its turn
    parrot(scripts=[words], context=48)
    code, out, err = run_chat(monkeypatch, capsys, [], "-p", "hi", "--max-tokens", "512")
    room = 48 - len(render_for_completion(tok, [{"role": "user", "content": "hi"}]))
    assert code == 0
    assert out == tok.decode(words[:room]) + "\n"
    assert f"cut off at {room} tokens: the model's context is full" in err


# ---------------------------------------------------------------------------------------------
# Interactive mode, through stdin


def test_each_turn_sends_the_whole_conversation(parrot, tok, monkeypatch, capsys):
    model, _ = parrot()
    code, out, _ = run_chat(monkeypatch, capsys, ["Hello!", "Where is the cat?"])
    assert code == 0
    assert "Hi there.\n" in out and "The cat sat.\n" in out
    first, second = model.prompts
    assert first == render_for_completion(tok, [{"role": "user", "content": "Hello!"}])
    assert second == first + says(tok, "Hi there.") + user_turn(tok, "Where is the cat?") + \
        [tok.special_id("<|assistant_start|>")]


def test_clear_forgets_the_conversation(parrot, tok, monkeypatch, capsys):
    model, _ = parrot()
    code, out, _ = run_chat(monkeypatch, capsys, ["Hello!", "/clear", "Where is the cat?"])
    assert code == 0
    assert "(conversation cleared)" in out
    assert model.prompts[1] == render_for_completion(tok, [{"role": "user", "content": "Where is the cat?"}])


def test_clear_keeps_the_system_message(parrot, tok, monkeypatch, capsys):
    model, _ = parrot()
    run_chat(monkeypatch, capsys, ["Hello!", "/clear", "Again."], "--system", "Be kind.")
    assert model.prompts[1] == render_for_completion(tok, [{"role": "user", "content": "Be kind.\n\nAgain."}])


def test_temp_sets_the_temperature_and_refuses_bad_values(parrot, monkeypatch, capsys):
    _, engine = parrot()
    lines = ["one", "/temp 1.5", "two", "/temp -1", "/temp warm", "/temp nan", "/temp", "three", "/temp 0", "four"]
    code, out, err = run_chat(monkeypatch, capsys, lines, "--temperature", "0.6")
    assert code == 0
    assert [s.temperature for s in engine.settings] == [0.6, 1.5, 1.5, 0.0]
    assert err.count("/temp needs a number ≥ 0") == 3
    assert "got '-1'" in err and "got 'warm'" in err
    assert out.count("(temperature 1.5)") == 2  # set, then shown by /temp alone


def test_unknown_commands_and_blank_lines_do_not_stop_the_chat(parrot, monkeypatch, capsys):
    model, _ = parrot()
    code, out, err = run_chat(monkeypatch, capsys, ["/frobnicate now", "", "   ", "/help", "Hello!"])
    assert code == 0
    assert "unknown command /frobnicate; /help lists the commands" in err
    assert "/clear" in out and "/temp X" in out
    assert len(model.prompts) == 1  # blank lines and commands are not sent to the model


def test_quit_and_end_of_input_leave_cleanly(parrot, monkeypatch, capsys):
    model, _ = parrot()
    assert run_chat(monkeypatch, capsys, ["Hello!", "/quit", "never sent"])[0] == 0
    assert len(model.prompts) == 1
    assert run_chat(monkeypatch, capsys, [])[0] == 0  # Ctrl-D: end of input


def test_ctrl_c_at_the_prompt_leaves_cleanly(parrot, monkeypatch, capsys):
    parrot()
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    code = main(["chat", "--device", "cpu", "--max-tokens", "32"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "interrupted" not in err and "Traceback" not in err


def test_ctrl_c_during_a_reply_stops_it_and_forgets_that_exchange(parrot, tok, monkeypatch, capsys):
    model, _ = parrot(interrupt_at=0)
    code, out, err = run_chat(monkeypatch, capsys, ["Hello!", "Again."])
    assert code == 0
    assert "(reply stopped; that exchange is forgotten)" in err
    assert model.prompts[1] == render_for_completion(tok, [{"role": "user", "content": "Again."}])


def test_oldest_exchanges_are_dropped_when_the_context_is_full(parrot, tok, monkeypatch, capsys):
    model, _ = parrot(context=48)  # with --max-tokens 8, prompts of up to 40 tokens: two short exchanges
    lines = ["Hello!", "Where is the cat?", "And the mat?", "Hello!"]
    code, out, err = run_chat(monkeypatch, capsys, lines, "--max-tokens", "8")
    assert code == 0
    assert err.count("no longer fits the model's 48-token context: forgot the oldest 1 exchange)") == 2

    def user(text):
        return {"role": "user", "content": text}

    def bot(text):
        return {"role": "assistant", "content": text}

    assert model.prompts[2:] == [
        render_for_completion(tok, [user("Where is the cat?"), bot("The cat sat."), user("And the mat?")]),
        render_for_completion(tok, [user("And the mat?"), bot("Hi there."), user("Hello!")]),
    ]


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(parrot, tok, monkeypatch, capsys):
    model, _ = parrot(context=48)
    code, out, err = run_chat(monkeypatch, capsys, ["Hello!", "the cat sat on the mat " * 20, "Again."],
                              "--max-tokens", "8")
    assert code == 0
    assert "leaves no room for a reply in the model's context of 48 tokens" in err
    assert len(model.prompts) == 2
    assert "Hello!" in tok.decode(model.prompts[1])  # the conversation was kept


def test_calculator_use_goes_back_to_the_model_in_the_chat_format(parrot, tok, monkeypatch, capsys):
    sid = tok.special_id
    call, result, after = tok.encode_ordinary("2+3"), tok.encode_ordinary("5"), tok.encode_ordinary(" so 5.")
    forced = [sid("<|output_start|>"), *result, sid("<|output_end|>")]
    # While the engine forces the calculator's result, what the model "wants" is ignored (zeros).
    script = [sid("<|python_start|>"), *call, sid("<|python_end|>"), *[0] * len(forced), *after,
              sid("<|assistant_end|>")]
    model, _ = parrot(scripts=[script, says(tok, "Ok.")])
    code, out, _ = run_chat(monkeypatch, capsys, ["What is 2+3?", "Thanks."])
    assert code == 0
    assert "[2+3 = 5] so 5.\n" in out
    written = [sid("<|python_start|>"), *call, sid("<|python_end|>"), *forced, *after, sid("<|assistant_end|>")]
    assert model.prompts[1] == model.prompts[0] + written + user_turn(tok, "Thanks.") + [sid("<|assistant_start|>")]
