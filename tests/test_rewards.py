"""The verifiable rewards (nanochat/tasks/rewards.py), including replies written to game them."""

import pytest

from nanochat.tasks.arithmetic import ArithmeticTask
from nanochat.tasks.rewards import REWARDS, Reply, final_number, gsm8k_answer
from nanochat.tasks.spelling import SpellingTask


def text_reply(text: str, finished: bool = True) -> Reply:
    return Reply(({"type": "text", "text": text},), finished)


def tool_reply(expression: str, result: str, after: str = "", finished: bool = True) -> Reply:
    parts = [{"type": "text", "text": "Let me compute that."}, {"type": "python", "text": expression},
             {"type": "python_output", "text": result}]
    return Reply(tuple(parts + ([{"type": "text", "text": after}] if after else [])), finished)


def gsm8k(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "text", "text": f"Work.\n#### {answer}"}]}]}


ARITHMETIC = {"messages": [{"role": "user", "content": "What is 23 times 17?"},
                           {"role": "assistant", "content": [
                               {"type": "text", "text": "Let me compute that."}, {"type": "python", "text": "23*17"},
                               {"type": "python_output", "text": "391"},
                               {"type": "text", "text": "The answer is 391."}]}]}


@pytest.mark.parametrize(("text", "expected"), [
    ("She has 3 bags of 4, so 12.\n#### 12", 12.0),
    ("#### 1,200", 1200.0),                     # thousands commas
    ("#### $1,200 dollars", 1200.0),            # currency and unit
    ("#### 7.5 km\nthanks", 7.5),               # only the #### line is read
    ("#### -4", -4.0),
    ("#### 12 or 13", None),                    # two candidates: no answer
    ("#### 3\nthen 4\n#### 5", 5.0),            # the last #### is final
    ("The answer is 12.", None),                # no #### marker
    ("#### ", None),
])
def test_gsm8k_answer_reads_the_last_marked_number(text, expected):
    assert gsm8k_answer(text) == expected


def test_gsm8k_reward_is_strict_about_finish_tool_output_and_the_final_number():
    reward = REWARDS["gsm8k"]
    assert reward(text_reply("3 + 4 = 7, times 2 is 14.\n#### 14"), gsm8k("14")) == 1.0
    assert reward(text_reply("#### 14.0"), gsm8k("14")) == 1.0  # the same number
    assert reward(text_reply("#### 1,400"), gsm8k("1400")) == 1.0
    assert reward(text_reply("#### 15"), gsm8k("14")) == 0.0
    assert reward(text_reply("14 is the answer"), gsm8k("14")) == 0.0  # no ####
    assert reward(text_reply("#### 14", finished=False), gsm8k("14")) == 0.0  # cut off by the budget
    assert reward(text_reply("#### 14 or 15"), gsm8k("14")) == 0.0  # hedging
    assert reward(text_reply("#### 14\nActually\n#### 13"), gsm8k("14")) == 0.0  # the last one counts
    # the answer only inside a tool call (its expression and its forced output) is no answer
    assert reward(tool_reply("7*2", "14"), gsm8k("14")) == 0.0
    assert reward(tool_reply("7*2", "14", after="\n#### 14"), gsm8k("14")) == 1.0


@pytest.mark.parametrize(("text", "expected"), [
    ("The answer is 391.", 391.0),
    ("First 20 and 3, so 23. The answer is 23.", 23.0),  # earlier numbers are working
    ("The answer is 1,024.5.", 1024.5),
    ("It is 12 or 13.", None),                          # two in the final sentence
    ("It is 12. Or 13.", 13.0),                         # the last sentence decides
    ("no numbers here", None),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_arithmetic_reward_and_its_own_task():
    reward = REWARDS["arithmetic"]
    assert reward(tool_reply("23*17", "391", "The answer is 391."), ARITHMETIC) == 1.0
    assert reward(tool_reply("23*17", "391"), ARITHMETIC) == 0.0  # stated only by the tool
    assert reward(tool_reply("23*17", "391", "The answer is 391.", finished=False), ARITHMETIC) == 0.0
    assert reward(tool_reply("23*17", "391", "The answer is 392."), ARITHMETIC) == 0.0
    assert reward(text_reply("The answer is 391 or 390."), ARITHMETIC) == 0.0
    assert reward(text_reply("The answer is 391."), ARITHMETIC) == 1.0  # in its head is fine too
    # every reference of the task earns its own reward: the reward reads the task's format
    task = ArithmeticTask("val", size=50)
    for conv in task:
        reply = Reply(tuple(conv["messages"][-1]["content"]), True)
        assert reward(reply, conv) == 1.0, conv


def test_spelling_reward_on_every_kind_of_question():
    reward = REWARDS["spelling"]
    task = SpellingTask("val", size=60)
    kinds = set()
    for conv in task:
        reference = conv["messages"][-1]["content"]
        kinds.add("count" if "appears" in reference else "backwards" if "Backwards" in reference else "spell")
        assert reward(text_reply(reference), conv) == 1.0, reference
        assert reward(text_reply(reference, finished=False), conv) == 0.0
    assert kinds == {"count", "backwards", "spell"}
    count = {"messages": [{"role": "user", "content": "How many 'r' are in strawberry?"}, {
        "role": "assistant", "content": 'Let me spell "strawberry": s, t, r (1), a, w, b, e, r (2), r (3), y. '
                                        "So the letter 'r' appears 3 times in \"strawberry\"."}]}
    assert reward(text_reply("s, t, r (1), r (2). So it appears 2 times."), count) == 0.0
    assert reward(text_reply("It appears 3 times."), count) == 1.0
    assert reward(text_reply("It appears 2 or 3 times."), count) == 0.0
    spell = {"messages": [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t."}]}
    assert reward(text_reply("c-a-t."), spell) == 1.0
    assert reward(text_reply("c-a-t or c-a-t-t."), spell) == 0.0
    assert reward(text_reply("c-a-t-t."), spell) == 0.0


def test_reply_of_tokens_reads_parts_and_finish():
    from nanochat.tokenizer import Tokenizer

    tok = Tokenizer.train(["Let me compute that. The answer is 391. " * 50], 290)
    sid = tok.special_id
    tokens = [*tok.encode_ordinary("Let me compute that."), sid("<|python_start|>"), *tok.encode_ordinary("23*17"),
              sid("<|python_end|>"), sid("<|output_start|>"), *tok.encode_ordinary("391"), sid("<|output_end|>"),
              *tok.encode_ordinary("The answer is 391.")]
    cut = Reply.of(tok, tokens)
    done = Reply.of(tok, [*tokens, sid("<|assistant_end|>")])
    assert not cut.finished and done.finished
    assert done.text == "Let me compute that.The answer is 391."
    assert [p["type"] for p in done.parts] == ["text", "python", "python_output", "text"]
    assert REWARDS["arithmetic"](done, ARITHMETIC) == 1.0 and REWARDS["arithmetic"](cut, ARITHMETIC) == 0.0
