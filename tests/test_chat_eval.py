"""Chat evaluations: letter scoring of multiple choice, the evaluation tasks (nanochat.tasks) on
parquet fixtures in the published schemas (download stubbed), generative scoring with injected
generations, HumanEval in the sandbox, and ChatCORE."""

import json
import re
import subprocess
import sys
import warnings

import pyarrow as pa
import pytest
import torch
from _hub_stub import stub_hub
from torch import nn

from nanochat.config import ModelConfig
from nanochat.evaluate import chat
from nanochat.evaluate.chat import (
    CHAT_TASKS,
    assistant_text,
    evaluate_chat,
    humaneval_program,
    letter_ids,
    mc_accuracy,
    mc_predictions,
    prompt_ids,
    score_arithmetic,
    score_gsm8k,
    score_humaneval,
    score_spelling,
)
from nanochat.gpt import GPT
from nanochat.runtime import Runtime
from nanochat.tasks import build_task
from nanochat.tasks.base import TaskError, rng
from nanochat.tasks.multiple_choice import multiple_choice
from nanochat.tasks.spelling import count_letter, spell, spell_backwards
from nanochat.tokenizer import Tokenizer

RT = Runtime(torch.device("cpu"), None)


@pytest.fixture(scope="module")
def tok():
    text = ("The cat sat on the mat. A B C D E answer with the letter. Which description fits Paris? "
            "Let me compute that: 23*17 is 391. How many letters are in strawberry? #### 72 ")
    with warnings.catch_warnings():  # a tiny text may support fewer merges than asked: fine here
        warnings.simplefilter("ignore")
        return Tokenizer.train([text] * 20, 320)


class OracleModel(nn.Module):
    """Logits that favour, after each known prompt, the token given for it; after any other
    prefix, `default` (token id -> logit)."""

    def __init__(self, vocab_size: int, answers: dict[tuple, int] | None = None, default: dict | None = None):
        super().__init__()
        self.vocab_size, self.answers, self.default = vocab_size, answers or {}, default or {}

    def forward(self, idx, targets=None, kv_cache=None):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                for token, value in self.default.items():
                    logits[b, t, token] = value
                answer = self.answers.get(tuple(row[:t + 1]))
                if answer is not None:
                    logits[b, t, answer] = 100.0
        return logits


def letter(tok, k: int) -> int:
    return tok.encode_ordinary("ABCDEFGHIJ"[k])[0]


def mc(question, choices, gold=0, subject=""):
    return multiple_choice(question, choices, gold, subject)


def mc_rows(task) -> list[tuple]:
    """A multiple-choice task as (question, choices, gold) rows, the question read back from the prompt."""
    return [(c["messages"][0]["content"].split("\n\n")[1], c["choices"], c["answer"]) for c in task]


# ---------------------------------------------------------------------------------------------
# Multiple choice


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_letters_map_to_their_tokens(tok, n):
    ids = letter_ids(tok, n)
    assert len(ids) == n
    for k, forms in enumerate(ids):
        assert letter(tok, k) in forms
        assert {tok.decode([t]).strip() for t in forms} == {"ABCDE"[k]}


def test_the_prompt_shows_lettered_choices_and_opens_the_reply(tok):
    conversation = mc("Which is a colour?", ["red", "seven", "fast"], 2)
    text = tok.decode(prompt_ids(tok, conversation))
    assert "Which is a colour?" in text and "A. red\nB. seven\nC. fast" in text
    assert text.startswith("<|bos|><|user_start|>") and text.endswith("<|user_end|><|assistant_start|>")
    assert conversation["messages"][1] == {"role": "assistant", "content": "C"}
    assert (conversation["choices"], conversation["answer"]) == (["red", "seven", "fast"], 2)


def test_accuracy_of_a_model_that_always_answers_b(tok):
    model = OracleModel(tok.vocab_size, default={letter(tok, 1): 5.0})
    items = [mc("q1", ["a", "b", "c", "d"], 1), mc("q2", ["a", "b", "c", "d"], 0), mc("q3", ["a", "b"], 1),
             mc("q4", ["a", "b", "c"], 2), mc("q5", ["a", "b", "c", "d", "e"], 1)]
    assert mc_accuracy(model, tok, items, RT) == pytest.approx(3 / 5)


def test_only_valid_letters_can_be_picked(tok):
    model = OracleModel(tok.vocab_size, default={letter(tok, 4): 9.0, letter(tok, 2): 5.0})  # E, then C
    items = [mc("q", ["a", "b", "c", "d"]), mc("q", ["a", "b", "c", "d", "e"])]
    assert mc_predictions(model, tok, items, RT) == [2, 4]


def test_each_item_is_scored_on_its_own_prompt_in_a_mixed_batch(tok):
    items = [mc(f"Question {i}?", [f"c{k}" for k in range(2 + i % 4)], (3 * i) % (2 + i % 4)) for i in range(11)]
    answers = {tuple(prompt_ids(tok, c)): letter(tok, c["answer"]) for c in items}
    model = OracleModel(tok.vocab_size, answers)
    assert mc_predictions(model, tok, items, RT, batch_size=4) == [c["answer"] for c in items]
    wrong = {key: letter(tok, (c["answer"] + 1) % len(c["choices"])) for c, key in zip(items, answers, strict=True)}
    assert mc_accuracy(OracleModel(tok.vocab_size, wrong), tok, items, RT) == 0.0


def test_a_real_model_gives_the_same_picks_batched_or_not(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, sequence_len=256), tok.vocab_size)
    items = [mc(f"What is {i} plus {i}?" + " really" * i, ["one", "two", "three", "four", "five"][:2 + i % 4])
             for i in range(6)]
    assert mc_predictions(model, tok, items, RT, batch_size=6) == mc_predictions(model, tok, items, RT, batch_size=1)


def test_wiki_multiple_choice_is_deterministic_and_well_formed():
    task = build_task("wiki_mc", "val")
    items = mc_rows(task)
    assert len(items) > 500 and items == mc_rows(build_task("wiki_mc", "test", seed=0))
    assert items != mc_rows(build_task("wiki_mc", "val", seed=1))
    for question, choices, gold in items[:200]:
        assert question.startswith("Which description fits ") and question.endswith("?")
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= gold < 4
    assert len({gold for _, _, gold in items[:200]}) == 4  # the truth is not always in one place
    assert [c["messages"][1]["content"] for c in task][:200] == ["ABCD"[gold] for _, _, gold in items[:200]]
    truths = {(q, choices[gold]) for q, choices, gold in items}
    assert truths.isdisjoint((q, c[g]) for q, c, g in mc_rows(build_task("wiki_mc", "train")))  # other articles
    assert CHAT_TASKS["wiki_mc"].load(30) == list(task)[:30]  # the evaluation reads the task, in its order


# ---------------------------------------------------------------------------------------------
# Evaluation tasks, with the hub download stubbed by parquet fixtures in the published schemas

ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
ARC_ROWS = [{"id": "Mercury_1", "question": "Which is a gas?",
             "choices": {"text": ["rock", "steam", "ice", "wood"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
            {"id": "NYSEDREGENTS_2", "question": "How many legs has a spider?",
             "choices": {"text": ["six", "four", "eight"], "label": ["1", "2", "3"]}, "answerKey": "3"}]
MMLU_SCHEMA = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                         ("answer", pa.int64())])
MMLU_ROWS = [{"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
             {"question": "Capital of France?", "subject": "geography", "choices": ["Lyon", "Nice", "Paris", "Metz"],
              "answer": 2}]
HUMANEVAL_SCHEMA = pa.schema([(c, pa.string()) for c in ("task_id", "prompt", "canonical_solution", "test",
                                                         "entry_point")])
PROBLEM = {"task_id": "HumanEval/0",
           "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n'
                     '    """\n',
           "canonical_solution": "    return a + b\n",
           "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
                   "    assert candidate(-1, 1) == 0\n",
           "entry_point": "add"}
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
GSM8K_ROWS = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
              {"question": "A box holds 1,000 beads; 1 is lost. How many are left?",
               "answer": "1000-1=<<1000-1=999>>999\n#### 999"}]

FIXTURES = {
    ("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet"): (ARC_SCHEMA, ARC_ROWS),
    ("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet"): (ARC_SCHEMA, ARC_ROWS[1:]),
    ("allenai/ai2_arc", "ARC-Easy/train-00000-of-00001.parquet"): (ARC_SCHEMA, ARC_ROWS[::-1]),
    ("cais/mmlu", "all/test-00000-of-00001.parquet"): (MMLU_SCHEMA, MMLU_ROWS),
    ("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet"): (HUMANEVAL_SCHEMA, [PROBLEM]),
    ("openai/gsm8k", "main/test-00000-of-00001.parquet"): (GSM8K_SCHEMA, GSM8K_ROWS),
}


@pytest.fixture
def hub_stub(tmp_path, monkeypatch):
    return stub_hub(monkeypatch, tmp_path, FIXTURES)


def test_arc_reads_the_published_schema(hub_stub, tmp_path):
    easy = build_task("arc_easy", "test")
    assert mc_rows(easy) == [("Which is a gas?", ["rock", "steam", "ice", "wood"], 1),
                             ("How many legs has a spider?", ["six", "four", "eight"], 2)]
    assert [c["messages"][1]["content"] for c in easy] == ["B", "C"]  # "3" of labels 1..3 is the letter C
    assert mc_rows(build_task("arc_challenge", "val")) == mc_rows(easy)[1:]
    build_task("arc_easy", "test")
    assert hub_stub == [("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet"),
                        ("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet")]  # cached afterwards
    assert (tmp_path / "data" / "tasks" / "arc" / "ARC-Easy" / "test-00000-of-00001.parquet").is_file()
    assert mc_rows(build_task("arc_easy", "train")) == mc_rows(easy)[::-1]  # the published train split


def test_mmlu_test_reads_the_published_schema(hub_stub, tok, tmp_path):
    task = build_task("mmlu_test", "test")
    assert hub_stub == [("cais/mmlu", "all/test-00000-of-00001.parquet")]
    assert (tmp_path / "data" / "tasks" / "mmlu" / "all" / "test-00000-of-00001.parquet").is_file()
    assert mc_rows(task)[1] == ("Capital of France?", ["Lyon", "Nice", "Paris", "Metz"], 2)
    assert "about geography" in tok.decode(prompt_ids(tok, task[1]))
    with pytest.raises(TaskError, match="no train split"):
        build_task("mmlu_test", "train")


def test_mmlu_evaluates_a_fixed_shuffle_of_a_subset_and_all_of_it_in_file_order(hub_stub, monkeypatch):
    rows = [{"question": f"Q{i}?", "subject": f"subject_{i // 10}", "choices": ["a", "b", "c", "d"], "answer": i % 4}
            for i in range(40)]
    monkeypatch.setitem(FIXTURES, ("cais/mmlu", "all/test-00000-of-00001.parquet"), (MMLU_SCHEMA, rows))
    order = list(range(40))
    rng("mmlu-eval").shuffle(order)  # the file is sorted by subject: a prefix would be one subject
    questions = [f"Q{i}?" for i in order[:12]]
    assert [q for q, _, _ in mc_rows(CHAT_TASKS["mmlu"].load(12))] == questions
    assert [q for q, _, _ in mc_rows(CHAT_TASKS["mmlu"].load(None))] == [f"Q{i}?" for i in range(40)]
    assert [q for q, _, _ in mc_rows(CHAT_TASKS["mmlu"].load(40))] == [f"Q{i}?" for i in range(40)]
    assert [q for q, _, _ in mc_rows(CHAT_TASKS["arc_easy"].load(1))] == ["Which is a gas?"]  # a plain prefix


def test_online_multiple_choice_through_evaluate_chat(hub_stub, tok):
    model = OracleModel(tok.vocab_size, default={letter(tok, 2): 5.0})  # always C
    result = evaluate_chat(model, tok, RT, tasks=("arc_easy", "mmlu"))
    arc, mmlu = result["tasks"]["arc_easy"], result["tasks"]["mmlu"]
    assert (arc["correct"], arc["total"]) == (1, 2) and arc["baseline"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert (mmlu["correct"], mmlu["total"], mmlu["baseline"]) == (1, 2, 0.25)
    assert mmlu["centered"] == pytest.approx((0.5 - 0.25) / 0.75)
    assert result["chatcore"] == pytest.approx((arc["centered"] + mmlu["centered"]) / 2)


# ---------------------------------------------------------------------------------------------
# Generative tasks


def replying(tok, answer_for):
    """A generation function (max_new_tokens -> Generate) that answers each prompt's question
    with answer_for(question), closed with <|assistant_end|>."""
    end = tok.special_id("<|assistant_end|>")

    def make(max_new_tokens):
        def run(prompts):
            out = []
            for p in prompts:
                question = re.search(r"<\|user_start\|>(.*)<\|user_end\|>", tok.decode(p), re.DOTALL).group(1)
                out.append(tok.encode_ordinary(answer_for(question)) + [end])
            return out
        return run

    return make


def test_gsm8k_scores_the_final_number(hub_stub, tok):
    answers = {"Tom has 3 apples and buys 4 more. How many?": "3 and 4 make 7.\n#### 7",
               "A box holds 1,000 beads; 1 is lost. How many are left?": "999 beads, not 1,000.\n#### 1,000"}
    result = evaluate_chat(None, tok, RT, tasks=("gsm8k",), generate=replying(tok, answers.get))
    assert result["tasks"]["gsm8k"] == {"accuracy": 0.5, "centered": 0.5, "correct": 1, "total": 2, "baseline": 0.0}
    assert score_gsm8k("so #### 1,000", "#### 1000") and not score_gsm8k("the answer is 7", "#### 7")


def test_humaneval_runs_the_completion_against_the_tests(hub_stub):
    task = build_task("humaneval", "test")
    assert len(task) == 1
    problem = task[0]["problem"]
    assert problem == PROBLEM and PROBLEM["prompt"] in task[0]["messages"][0]["content"]
    assert score_humaneval(assistant_text(task[0]), problem)  # the task's own answer passes
    assert score_humaneval(PROBLEM["canonical_solution"], problem)
    assert not score_humaneval("    return a - b\n", problem)
    whole = "Here it is:\n```python\ndef add(a, b):\n    return b + a\n```\nDone."
    assert score_humaneval(whole, problem)  # a fenced whole function redefines the prompt's
    assert "check(add)" in humaneval_program(problem, "    return a + b\n")


def test_humaneval_through_evaluate_chat(hub_stub, tok):
    good = evaluate_chat(None, tok, RT, tasks=("humaneval",), generate=replying(tok, lambda q: "    return a + b\n"))
    bad = evaluate_chat(None, tok, RT, tasks=("humaneval",), generate=replying(tok, lambda q: "    return 0\n"))
    assert good["tasks"]["humaneval"]["accuracy"] == 1.0 and bad["tasks"]["humaneval"]["accuracy"] == 0.0


def test_spelling_and_arithmetic_score_the_final_answer():
    r = rng("t")
    for conv, wrong in [(count_letter("strawberry", "r", r), "So the letter 'r' appears 2 times."),
                        (spell("cat", r), "c-a-r."), (spell_backwards("cat", r), "Backwards it is c-a-t.")]:
        reference = conv["messages"][1]["content"]
        assert score_spelling(reference, reference) and not score_spelling(wrong, reference)
    assert score_spelling("s, t, r (1), a, w, b, e, r (2), r (3), y. That is 3 times.",
                          count_letter("strawberry", "r", r)["messages"][1]["content"])
    tool_reply = "23*17<|python_end|><|output_start|>391<|output_end|>The answer is 391."
    assert score_arithmetic(tool_reply, "The answer is 391.")
    assert not score_arithmetic("The answer is 390.", "The answer is 391.")
    assert score_arithmetic("It is 2.5", "2.50") and not score_arithmetic("no idea", "5")


def test_the_default_generation_runs_a_real_model_through_the_engine(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=1, aspect_ratio=32, head_dim=16, sequence_len=64), tok.vocab_size)
    result = evaluate_chat(model, tok, RT, tasks=("spelling", "arithmetic"), max_items=3, batch_size=2)
    assert [r["total"] for r in result["tasks"].values()] == [3, 3]
    replies = chat.greedy_generate(model, tok, RT, max_new_tokens=1000)([[tok.bos_id] * 200, [tok.bos_id] * 10])
    assert len(replies) == 2 and 1 <= len(replies[0]) <= model.cos.size(0) - 200  # cut to the positions left


def offline_suite(tok, right: bool, max_items: int):
    """A model and generation that answer the offline tasks all right (or all wrong)."""
    answers = {tuple(prompt_ids(tok, c)): letter(tok, c["answer"] if right else (c["answer"] + 1) % len(c["choices"]))
               for c in CHAT_TASKS["wiki_mc"].load(max_items)}
    references = {c["messages"][0]["content"]: assistant_text(c)
                  for c in CHAT_TASKS["spelling"].load(max_items) + CHAT_TASKS["arithmetic"].load(max_items)}
    return OracleModel(tok.vocab_size, answers), replying(tok, lambda q: references[q] if right else "I don't know.")


def test_chatcore_is_one_for_a_perfect_model_and_negative_for_a_wrong_one(tok):
    model, generate = offline_suite(tok, True, 12)
    result = evaluate_chat(model, tok, RT, max_items=12, generate=generate)
    assert set(result["tasks"]) == {"wiki_mc", "spelling", "arithmetic"}
    assert all(r["accuracy"] == 1.0 and r["total"] == 12 for r in result["tasks"].values())
    assert result["chatcore"] == 1.0
    model, generate = offline_suite(tok, False, 12)
    result = evaluate_chat(model, tok, RT, max_items=12, generate=generate)
    assert [r["correct"] for r in result["tasks"].values()] == [0, 0, 0]
    assert result["chatcore"] == pytest.approx((-0.25 / 0.75 + 0 + 0) / 3)  # worse than guessing: negative


def test_ranks_split_the_items_and_together_count_each_once(tok):
    model, generate = offline_suite(tok, True, 9)
    ranks = [evaluate_chat(model, tok, Runtime(torch.device("cpu"), None, rank=r, world_size=2), max_items=9,
                           generate=generate) for r in range(2)]  # no process group: each rank's own counts
    for name in ("wiki_mc", "spelling", "arithmetic"):
        assert [rank["tasks"][name]["total"] for rank in ranks] == [5, 4]
        assert sum(rank["tasks"][name]["correct"] for rank in ranks) == 9


def test_unknown_tasks_are_refused(tok):
    with pytest.raises(TaskError, match="unknown chat evaluation task"):
        evaluate_chat(None, tok, RT, tasks=("wiki_mc", "trivia"))


DIST_WORKER = r"""
import json, re, sys, warnings
from nanochat.evaluate.chat import CHAT_TASKS, assistant_text, evaluate_chat
from nanochat.runtime import init_runtime, teardown
from nanochat.tokenizer import Tokenizer

rt = init_runtime(device="cpu")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tok = Tokenizer.train(["The answer is 391. How many apples?"] * 20, 300)
items = [(c["messages"][0]["content"], assistant_text(c)) for c in CHAT_TASKS["arithmetic"].load(10)]
end = tok.special_id("<|assistant_end|>")

def make(max_new_tokens):
    def run(prompts):
        out = []
        for p in prompts:
            q = re.search(r"<\|user_start\|>(.*)<\|user_end\|>", tok.decode(p), re.S).group(1)
            i = [question for question, _ in items].index(q)
            out.append(tok.encode_ordinary(items[i][1] if i % 3 else "No idea.") + [end])  # wrong on 0, 3, 6, 9
        return out
    return run

result = evaluate_chat(None, tok, rt, tasks=("arithmetic",), max_items=10, generate=make)
with open(f"{sys.argv[1]}/rank{rt.rank}.json", "w") as f:
    json.dump(result, f)
teardown()
"""


def test_two_ranks_under_torchrun_all_reduce_the_counts(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DIST_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["tasks"]["arithmetic"] == {"accuracy": 0.6, "centered": 0.6, "correct": 6, "total": 10,
                                                 "baseline": 0.0}
