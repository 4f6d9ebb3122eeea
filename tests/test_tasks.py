"""Chat tasks: determinism, rendering and loss masks, held-out splits, mixtures, the spec parser,
and the online loaders on parquet fixtures in the published schemas (download stubbed). The
evaluation-only tasks' loaders are tested with their scoring, in test_chat_eval.py."""

import re
import warnings
from collections import Counter

import pyarrow as pa
import pytest
from _hub_stub import stub_hub

from nanochat.chat_format import render_conversation
from nanochat.data.offline import is_validation
from nanochat.errors import NanochatError
from nanochat.tasks import (
    GSM8K,
    MMLU,
    OFFLINE_MIDTRAIN,
    OFFLINE_SFT,
    OFFLINE_TASKS,
    TASKS,
    ArithmeticTask,
    IdentityTask,
    Mixture,
    SmolTalk,
    SpellingTask,
    Task,
    WikiMC,
    WikiTask,
    build_mixture,
    build_task,
    hub,
    parse_spec,
    wiki_eval_items,
)
from nanochat.tasks.arithmetic import CalculatorError, calculate
from nanochat.tasks.gsm8k import extract_answer, solution_parts
from nanochat.tasks.identity import TOPICS, questions
from nanochat.tasks.wiki import articles, sentences
from nanochat.tokenizer import Tokenizer

OFFLINE = [IdentityTask, WikiTask, SpellingTask, ArithmeticTask, WikiMC]


@pytest.fixture(scope="module")
def tok():
    text = ("The cat sat on the mat. Let me compute that: 23*17 is 391. How many letters are in strawberry? "
            "nanochat is a small chat model trained from scratch. Qué es. C'est quoi ? ")
    with warnings.catch_warnings():  # a tiny text may support fewer merges than asked: fine here
        warnings.simplefilter("ignore")
        return Tokenizer.train([text] * 20, 300)


def sample(task: Task, k: int = 25) -> list[dict]:
    step = max(1, len(task) // k)
    return [task[i] for i in range(0, len(task), step)][:k]


def spans(tok, ids, mask):
    """Decoded runs of consecutive tokens with the same mask value: [(learned, text), ...]."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs.append((bool(mask[start]), tok.decode(ids[start:i])))
            start = i
    return runs


def expected_learned(conversation: dict) -> str:
    """What the assistant writes: its text and tool calls (with their tokens), each turn closed by
    <|assistant_end|>; never the forced tool output."""
    out = []
    for m in conversation["messages"]:
        if m["role"] != "assistant":
            continue
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for p in parts:
            if p["type"] == "text":
                out.append(p["text"])
            elif p["type"] == "python":
                out.append(f"<|python_start|>{p['text']}<|python_end|>")
        out.append("<|assistant_end|>")
    return "".join(out)


def check_renders(tok, conversations):
    for conv in conversations:
        ids, mask = render_conversation(tok, conv["messages"])
        assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
        learned = "".join(text for is_learned, text in spans(tok, ids, mask) if is_learned)
        assert learned == expected_learned(conv)
        assert "<|output_start|>" not in learned and "<|user_start|>" not in learned


# ---------------------------------------------------------------------------------------------
# Offline tasks


@pytest.mark.parametrize("cls", OFFLINE)
def test_offline_task_is_deterministic_and_renders(cls, tok):
    a, b = cls("train", seed=3), cls("train", seed=3)
    assert len(a) == len(b) > 0 and a.split == "train"
    assert sample(a) == sample(b)
    assert a[-1] == a[len(a) - 1]
    with pytest.raises(IndexError):
        a[len(a)]
    val = cls("val", seed=3)
    assert val.split == "val" and 0 < len(val) < len(a)
    check_renders(tok, sample(a) + sample(val, 10))


@pytest.mark.parametrize("cls", [IdentityTask, SpellingTask, ArithmeticTask, WikiTask, WikiMC])
def test_seed_changes_the_conversations(cls):
    assert sample(cls("train", seed=0)) != sample(cls("train", seed=1))


def test_unknown_split_is_refused():
    with pytest.raises(NanochatError, match="unknown split"):
        ArithmeticTask("dev")


def test_every_task_is_registered_and_test_sets_have_no_train_split():
    assert set(OFFLINE_TASKS) <= set(TASKS) and {cls.name for cls in OFFLINE} == set(OFFLINE_TASKS)
    assert {"arc_easy", "arc_challenge", "mmlu_test", "humaneval", "wiki_mc"} <= set(TASKS)
    assert all(TASKS[name].name == name for name in TASKS)
    for name in ("mmlu_test", "humaneval"):  # refused before any download is tried
        with pytest.raises(NanochatError, match=f"'{name}' is a test set.*no train split"):
            build_task(name, "train")
        with pytest.raises(NanochatError, match="no train split"):
            build_mixture(f"wiki,{name}", "train", 0)


def test_wiki_multiple_choice_carries_its_choices_and_answer(tok):
    val = build_task("wiki_mc", "val")
    for conv in sample(val, 50):
        (user, assistant), choices, answer = conv["messages"], conv["choices"], conv["answer"]
        assert assistant["content"] == "ABCD"[answer] and len(choices) == 4
        assert all(f"{'ABCD'[k]}. {choice}" in user["content"] for k, choice in enumerate(choices))
    check_renders(tok, sample(val, 10))  # the letter alone is learned


def test_calculator():
    assert calculate("23*17") == "391"
    assert calculate("84/7") == "12"
    assert calculate("10/4") == "2.5"
    assert calculate("10/3") == "3.333333"
    assert calculate("(2+3)*-4 - 2**3") == "-28"
    assert calculate("7//2 + 7%2") == "4"
    for bad in ("__import__('os')", "1/0", "9**999999", "a+1", "2+", "[1]*3", "'a'*3", "True+1"):
        with pytest.raises(CalculatorError):
            calculate(bad)


def test_arithmetic_mask_covers_the_call_not_the_output(tok):
    task = ArithmeticTask("train", seed=0, size=200)
    for conv in sample(task, 40):
        user, assistant = conv["messages"]
        kinds = [p["type"] for p in assistant["content"]]
        assert kinds == ["text", "python", "python_output", "text"]
        expression, output = assistant["content"][1]["text"], assistant["content"][2]["text"]
        value = eval(expression)  # the test's own check: plain Python on a trusted expression
        assert float(output) == value and output == calculate(expression)
        assert assistant["content"][3]["text"] == f"The answer is {output}."
        runs = spans(tok, *render_conversation(tok, conv["messages"]))
        assert (True, f"<|python_start|>{expression}<|python_end|>") in [
            (learned, text[text.find("<|python_start|>"):]) for learned, text in runs if learned]
        forced = [text for learned, text in runs if not learned and "<|output_start|>" in text]
        assert forced == [f"<|output_start|>{output}<|output_end|>"]
        assert user["content"] in "".join(text for learned, text in runs if not learned)


def test_arithmetic_splits_have_disjoint_expressions():
    def expressions(split):
        return {c["messages"][1]["content"][1]["text"] for c in ArithmeticTask(split, size=300)}
    assert not expressions("train") & expressions("val")


def test_spelling_answers_are_correct_and_splits_disjoint():
    task = SpellingTask("train", seed=0, size=300)
    counted = 0
    for conv in task:
        question, answer = conv["messages"][0]["content"], conv["messages"][1]["content"]
        m = re.search(r"the letter '(\w)' appears (\d+) times? in \"(\w+)\"", answer)
        if m:
            letter, n, word = m.group(1), int(m.group(2)), m.group(3)
            assert word in question and n == word.count(letter)
            assert f"({n})" in answer if n else "(1)" not in answer
            counted += 1
        elif "backwards" in answer.lower() or "Backwards" in answer:
            word = re.search(r'"(\w+)"', answer).group(1)
            assert "-".join(word[::-1]) in answer
        else:
            assert [w for w in re.findall(r"[a-z]+", question) if w in task.words and f"{'-'.join(w)}." in answer]
    assert counted > 50
    assert not set(task.words) & set(SpellingTask("val").words)


def test_wiki_held_out_split_matches_the_corpus():
    train, val = WikiTask("train"), WikiTask("val")
    keys = lambda t: {(a["lang"], a["title"]) for a in t.articles}  # noqa: E731
    assert not keys(train) & keys(val)
    assert all(is_validation(a) for a in val.articles) and not any(is_validation(a) for a in train.articles[:2000])
    assert len(val) == len(articles("val"))
    # the first answer is the start of the article's summary
    for i in range(0, len(val), 97):
        conv, article = val[i], val.articles[i]
        assert article["text"].startswith(conv["messages"][1]["content"].split(" ")[0])
    follow_ups = [c for c in sample(train, 200) if len(c["messages"]) > 2]
    assert follow_ups, "some conversations have follow-up turns"


def test_wiki_eval_items_come_from_held_out_articles():
    items = wiki_eval_items(20, seed=1)
    assert items == wiki_eval_items(20, seed=1) and items != wiki_eval_items(20, seed=2)
    assert len(items) == 20
    texts = [a["text"] for a in articles("val")]
    for question, reference in items:
        assert question and any(t.startswith(reference) for t in texts)


def test_sentence_splitting():
    assert sentences("It is 3 km west of Cape St. Vincent. It was built by J. R. Smith. Done!") == [
        "It is 3 km west of Cape St. Vincent.", "It was built by J. R. Smith.", "Done!"]
    assert sentences("Born in the U.S. Army base. Fine") == ["Born in the U.S. Army base.", "Fine"]


def test_identity_holds_out_phrasings_and_varies():
    for lang, topics in TOPICS.items():
        for topic in topics:
            train_q, val_q = questions(lang, topic, "train"), questions(lang, topic, "val")
            assert train_q and val_q and not set(train_q) & set(val_q)
    train = IdentityTask("train")
    val_questions = {q for lang, topics in TOPICS.items() for t in topics for q in questions(lang, t, "val")}
    train_users = {m["content"] for c in train for m in c["messages"] if m["role"] == "user"}
    assert not train_users & val_questions
    distinct = {repr(c) for c in train}
    assert len(distinct) > 500
    answers = Counter(m["content"] for c in train for m in c["messages"] if m["role"] == "assistant")
    assert len(answers) > 30 and max(answers.values()) < len(train) // 5
    assert any("trained by my user with nanochat" in a for a in answers)


# ---------------------------------------------------------------------------------------------
# Mixtures


class Numbers(Task):
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def _get(self, i):
        return {"messages": [{"role": "user", "content": f"{self.name}{i}"},
                             {"role": "assistant", "content": "ok"}]}


def contents(task):
    return [c["messages"][0]["content"] for c in task]


def test_mixture_weights_and_shuffling():
    a, b, c = Numbers("a", 10), Numbers("b", 20), Numbers("c", 8)
    mix = Mixture([(a, 2), (b, 0.5), (c, 1.5)], seed=0)
    seen = Counter(contents(mix))
    assert len(mix) == 20 + 10 + 12
    assert all(seen[f"a{i}"] == 2 for i in range(10))
    assert sum(1 for i in range(20) if seen[f"b{i}"] == 1) == 10 and max(seen[f"b{i}"] for i in range(20)) == 1
    assert sorted(seen[f"c{i}"] for i in range(8)) == [1] * 4 + [2] * 4
    order = contents(mix)
    assert order != sorted(order, key=lambda s: s[0])  # interleaved, not task after task
    assert contents(Mixture([(a, 2), (b, 0.5), (c, 1.5)], seed=0)) == order
    assert contents(Mixture([(a, 2), (b, 0.5), (c, 1.5)], seed=1)) != order
    assert mix.locate(0)[0].name == order[0][0]
    assert len(Mixture([(a, 1), (b, 0)])) == 10


def test_mixture_epochs_are_shuffled_differently():
    a, b = Numbers("a", 30), Numbers("b", 40)
    mix = Mixture([(a, 1), (b, 0.5)], seed=5, epochs=3)
    per_epoch = 30 + 20
    assert len(mix) == 3 * per_epoch
    epochs = [contents(mix)[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    for epoch in epochs:
        assert {x for x in epoch if x[0] == "a"} == {f"a{i}" for i in range(30)}
        assert len(set(epoch)) == per_epoch
    assert epochs[0] != epochs[1] != epochs[2]
    halves = [{x for x in epoch if x[0] == "b"} for epoch in epochs]
    assert halves[0] != halves[1]  # a different half of b each epoch
    assert contents(mix)[:per_epoch] == contents(Mixture([(a, 1), (b, 0.5)], seed=5, epochs=1))


def test_mixture_refuses_bad_input():
    a = Numbers("a", 3)
    for bad in ([], [(a, -1)], [(a, float("nan"))]):
        with pytest.raises(NanochatError):
            Mixture(bad)
    with pytest.raises(NanochatError, match="epochs"):
        Mixture([(a, 1)], epochs=0)


def test_spec_parsing_and_unknown_names():
    assert parse_spec("identity:2, wiki ,spelling:0.5") == [("identity", 2.0), ("wiki", 1.0), ("spelling", 0.5)]
    with pytest.raises(NanochatError) as e:
        build_mixture("identity,bogus:2", "train", 0)
    assert "bogus" in str(e.value) and all(name in str(e.value) for name in TASKS)
    for bad in ("identity:x", "identity:-1", "identity,,wiki", "wiki,wiki:2"):
        with pytest.raises(NanochatError):
            parse_spec(bad)


@pytest.mark.parametrize("spec", [OFFLINE_MIDTRAIN, OFFLINE_SFT])
def test_default_specs_build_offline(spec, tok):
    train = build_mixture(spec, "train", seed=0)
    val = build_mixture(spec, "val", seed=0)
    assert {name for name, _ in parse_spec(spec)} == {"identity", "wiki", "spelling", "arithmetic"}
    assert len(train) > len(val) > 0 and val.split == "val"
    assert sample(train, 10) == sample(build_mixture(spec, "train", seed=0), 10)
    check_renders(tok, sample(train, 20))


# ---------------------------------------------------------------------------------------------
# Online tasks, with the hub download stubbed by parquet fixtures in the published schemas

SMOLTALK_SCHEMA = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                             ("source", pa.string())])
MMLU_AUX_SCHEMA = pa.schema([("train", pa.struct([("answer", pa.int64()), ("choices", pa.list_(pa.string())),
                                                  ("question", pa.string()), ("subject", pa.string())]))])
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])

SMOLTALK_ROWS = [
    {"messages": [{"content": "You are a helpful assistant.", "role": "system"},
                  {"content": "Write a haiku about rain.", "role": "user"},
                  {"content": "Soft rain on the roof", "role": "assistant"},
                  {"content": "Another one?", "role": "user"},
                  {"content": "Grey clouds drift away", "role": "assistant"}], "source": "smol-magpie-ultra"},
    {"messages": [{"content": "What is 2+2?", "role": "user"}, {"content": "4.", "role": "assistant"},
                  {"content": "Thanks", "role": "user"}], "source": "everyday-conversations"},
]
MMLU_ROWS = [{"train": {"answer": i % 4, "choices": [f"opt{i}{k}" for k in "wxyz"], "question": f"Question {i}?",
                        "subject": "" if i % 2 else "high_school_physics"}} for i in range(300)]
GSM8K_ROWS = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                           "clips in May. How many clips did Natalia sell altogether in April and May?",
               "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                         "clips altogether in April and May.\n#### 72"},
              {"question": "Weng earns $12 an hour. How much did she earn for 50 minutes?",
               "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
                         "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"}]

FIXTURES = {
    ("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet"): (SMOLTALK_SCHEMA, SMOLTALK_ROWS),
    **{("HuggingFaceTB/smol-smoltalk", f"data/train-{i:05d}-of-00004.parquet"): (SMOLTALK_SCHEMA, SMOLTALK_ROWS)
       for i in range(4)},
    ("cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet"): (MMLU_AUX_SCHEMA, MMLU_ROWS),
    ("openai/gsm8k", "main/train-00000-of-00001.parquet"): (GSM8K_SCHEMA, GSM8K_ROWS),
    ("openai/gsm8k", "main/test-00000-of-00001.parquet"): (GSM8K_SCHEMA, GSM8K_ROWS[:1]),
}


@pytest.fixture
def hub_stub(tmp_path, monkeypatch):
    return stub_hub(monkeypatch, tmp_path, FIXTURES)


def test_smoltalk_reads_the_published_schema(hub_stub, tok, tmp_path):
    test = SmolTalk("test")
    assert hub_stub == [("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet")]
    assert (tmp_path / "data" / "tasks" / "smoltalk" / "data" / "test-00000-of-00001.parquet").is_file()
    assert len(test) == 2 and test.split == "test" and SmolTalk("val").split == "test"
    first, second = test[0]["messages"], test[1]["messages"]
    assert first[0] == {"role": "system", "content": "You are a helpful assistant."} and len(first) == 5
    assert [m["role"] for m in second] == ["user", "assistant"]  # the unanswered last turn is dropped
    check_renders(tok, list(test))
    ids, _ = render_conversation(tok, first)
    assert tok.decode(ids).startswith("<|bos|><|user_start|>You are a helpful assistant.\n\nWrite a haiku")
    assert len(SmolTalk("train")) == 8 and len(hub_stub) == 5
    SmolTalk("test")
    assert len(hub_stub) == 5  # cached: no second download


def test_mmlu_reads_the_nested_auxiliary_train_schema(hub_stub, tok):
    train, val = MMLU("train"), MMLU("val")
    assert hub_stub == [("cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet")]
    assert len(train) + len(val) == 300 and len(val) < 30
    seen = {c["messages"][0]["content"].split("\n\n")[1] for c in list(train) + list(val)}
    assert len(seen) == 300
    for conv in list(train)[:12]:
        prompt, answer = conv["messages"][0]["content"], conv["messages"][1]["content"]
        i = int(re.search(r"Question (\d+)\?", prompt).group(1))
        assert answer == "ABCD"[i % 4] and f"{answer}. opt{i}{'wxyz'[i % 4]}" in prompt
        assert ("about high school physics" in prompt) == (i % 2 == 0)
    check_renders(tok, list(train)[:10])


def test_mmlu_also_reads_flat_columns(hub_stub, monkeypatch):
    flat = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                      ("answer", pa.int64())])
    monkeypatch.setitem(FIXTURES, ("cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet"),
                        (flat, [row["train"] for row in MMLU_ROWS]))
    assert len(MMLU("train")) + len(MMLU("val")) == 300


def test_gsm8k_turns_calculations_into_tool_calls(hub_stub, tok):
    train = GSM8K("train")
    assert len(train) == 2 and len(GSM8K("test")) == 1
    parts = train[0]["messages"][1]["content"]
    assert [(p["type"], p["text"]) for p in parts if p["type"] != "text"] == [
        ("python", "48/2"), ("python_output", "24"), ("python", "48+24"), ("python_output", "72")]
    assert "".join(p["text"] for p in parts if p["type"] == "text").endswith("#### 72")
    assert "<<" not in str(parts)
    assert [p["text"] for p in train[1]["messages"][1]["content"] if p["type"] == "python_output"] == ["0.2", "10"]
    check_renders(tok, list(train))
    assert extract_answer("so #### 1,234") == "1234" and extract_answer("no answer") is None
    assert solution_parts("x = <<3*$2=6>>6\n#### 6")[2] == {"type": "python_output", "text": "6"}


def test_offline_without_cache_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))

    def no_network(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(hub, "hf_hub_download", no_network)
    for cls, name in ((SmolTalk, "smoltalk"), (MMLU, "mmlu"), (GSM8K, "gsm8k")):
        with pytest.raises(NanochatError, match=f"Connect to the internet.*leave '{name}' out"):
            cls("train")
    for name in ("arc_easy", "arc_challenge", "mmlu_test", "humaneval"):
        with pytest.raises(NanochatError, match=f"Connect to the internet.*leave '{name}' out.*wiki_mc"):
            build_task(name, "test")
