"""CORE evaluation on a handmade eval bundle: the bundle is read and validated (data/core_bundle.py),
an oracle scores 1 centered, chance scores 0 (evaluate/core.py)."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanochat.config import ModelConfig
from nanochat.data.core_bundle import CoreTask, load_bundle
from nanochat.errors import NanochatError
from nanochat.evaluate import core
from nanochat.gpt import GPT
from nanochat.runtime import Runtime
from nanochat.tokenizer import Tokenizer

CPU = Runtime(torch.device("cpu"), None)
N_ITEMS = 10


class ByteTokenizer:
    """UTF-8 bytes as ids, BOS = 256: every split point is exact, so expected pairs are obvious."""
    bos_id = 256
    vocab_size = 257

    def encode_batch(self, texts, num_threads=None, **kwargs):
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i != self.bos_id).decode("utf-8")


# label: (type, num_fewshot, delimiter, random baseline in percent)
TASKS = {
    "mc4_fewshot": ("multiple_choice", 2, " ", 25.0),
    "mc2_zeroshot": ("multiple_choice", 0, "\nAnswer: ", 50.0),
    "schema_fewshot": ("schema", 1, " ", 50.0),
    "lm_fewshot": ("language_modeling", 2, " ", 0.0),
    "lm_zeroshot": ("language_modeling", 0, "", 0.0),
}
NOUNS = ["cat", "dog", "owl", "fox", "eel", "yak", "ant", "bee"]


def make_items(label: str, kind: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i in range(N_ITEMS):
        if kind == "multiple_choice":
            n_choices = 4 if label.startswith("mc4") else 2
            choices = [f"{noun} number {i}" for noun in rng.sample(NOUNS, n_choices)]
            items.append({"query": f"Which animal is item {i} of {label}?", "choices": choices,
                          "gold": rng.randrange(n_choices)})
        elif kind == "schema":
            a, b = rng.sample(NOUNS, 2)
            items.append({"context_options": [f"The {a} chased item {i}.", f"The {b} chased item {i}."],
                          "continuation": "It ran away.", "gold": rng.randrange(2)})
        else:
            items.append({"context": f"Counting for {label} item {i}:", "continuation": f"{i} {i + 1} {i + 2}"})
    return items


def gold_text(kind: str, delimiter: str, item: dict) -> str:
    """An item's text with its right answer, written out independently of the code under test."""
    if kind == "multiple_choice":
        return item["query"] + delimiter + item["choices"][item["gold"]]
    if kind == "schema":
        return item["context_options"][item["gold"]] + delimiter + item["continuation"]
    return item["context"] + delimiter + item["continuation"]


def write_bundle(root, tasks=TASKS, yaml_list_shots=True):
    (root / "eval_data" / "sub").mkdir(parents=True)
    lines = ["icl_tasks:"]
    csv_rows = ["Eval Task,Task Category,Random baseline"]
    items = {}
    for n, (label, (kind, shots, delim, baseline)) in enumerate(tasks.items()):
        items[label] = make_items(label, kind, seed=n)
        with open(root / "eval_data" / "sub" / f"{label}.jsonl", "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items[label])
        lines += [f"- label: {label}", f"  dataset_uri: sub/{label}.jsonl",
                  f"  num_fewshot: {[shots] if yaml_list_shots else shots}", f"  icl_task_type: {kind}",
                  f"  continuation_delimiter: {json.dumps(delim)}"]
        csv_rows.append(f"{label},test,{baseline}")
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(csv_rows) + "\n")
    return items


@pytest.fixture
def bundle(tmp_path):
    items = write_bundle(tmp_path)
    return tmp_path, items


def oracle_scorer(tok, golds: set[str], inverted: bool = False):
    """Knows the answers: loss 0 (and a greedy match) on a text that ends in a right answer."""
    def score(pairs):
        right = [any(tok.decode(c + x).endswith(g) for g in golds) for c, x in pairs]
        if inverted:
            right = [not r for r in right]
        return [0.0 if r else 1.0 for r in right], right
    return score


def random_scorer(vocab_size: int, seed: int):
    """A model that guesses: uniformly random logits at every continuation position."""
    g = torch.Generator().manual_seed(seed)

    def score(pairs):
        losses, greedy = [], []
        for _, continuation in pairs:
            target = torch.tensor(continuation)
            logits = torch.randn(len(continuation), vocab_size, generator=g)
            losses.append(F.cross_entropy(logits, target).item())
            greedy.append(bool((logits.argmax(-1) == target).all()))
        return losses, greedy
    return score


def all_golds(items):
    return {gold_text(TASKS[label][0], TASKS[label][2], item) for label, its in items.items() for item in its}


# ---------------------------------------------------------------------------------------------


def test_load_bundle_reads_tasks(bundle):
    root, items = bundle
    tasks = load_bundle(root)
    assert [t.label for t in tasks] == list(TASKS) and all(isinstance(t, CoreTask) for t in tasks)
    for t in tasks:
        kind, shots, delim, baseline = TASKS[t.label]
        assert (t.kind, t.num_fewshot, t.delimiter) == (kind, shots, delim)
        assert t.baseline == pytest.approx(baseline / 100)
        assert t.items == items[t.label]


def test_load_bundle_accepts_plain_fewshot_and_default_delimiter(tmp_path):
    write_bundle(tmp_path, {"mc": ("multiple_choice", 3, " ", 25.0)}, yaml_list_shots=False)
    text = (tmp_path / "core.yaml").read_text().replace('  continuation_delimiter: " "\n', "")
    (tmp_path / "core.yaml").write_text(text)
    (task,) = load_bundle(tmp_path)
    assert (task.num_fewshot, task.delimiter) == (3, " ")


def test_oracle_scores_one_on_every_task(bundle):
    root, items = bundle
    tok = ByteTokenizer()
    result = core.evaluate_tasks(load_bundle(root), tok, oracle_scorer(tok, all_golds(items)), CPU)
    for label, r in result["tasks"].items():
        assert r == {"accuracy": 1.0, "centered": 1.0, "n": N_ITEMS,
                     "baseline": pytest.approx(TASKS[label][3] / 100)}, label
    assert result["core"] == 1.0


def test_wrong_answers_score_below_chance(bundle):
    """An oracle that always picks a wrong option: accuracy 0, centered -b/(1-b)."""
    root, items = bundle
    tok = ByteTokenizer()
    result = core.evaluate_tasks(load_bundle(root), tok, oracle_scorer(tok, all_golds(items), inverted=True), CPU)
    for label, r in result["tasks"].items():
        b = TASKS[label][3] / 100
        assert r["accuracy"] == 0.0, label
        assert r["centered"] == pytest.approx(-b / (1 - b)), label


def test_random_scorer_is_near_zero(bundle):
    root, _ = bundle
    tok, tasks = ByteTokenizer(), load_bundle(root)
    runs = [core.evaluate_tasks(tasks, tok, random_scorer(tok.vocab_size, seed), CPU) for seed in range(30)]
    mean_core = sum(r["core"] for r in runs) / len(runs)
    assert abs(mean_core) < 0.08, mean_core
    for label in TASKS:  # each task on its own is noisier: 300 items
        mean = sum(r["tasks"][label]["centered"] for r in runs) / len(runs)
        assert abs(mean) < 0.2, (label, mean)


def test_pairs_split_at_the_answer(bundle):
    root, items = bundle
    tok = ByteTokenizer()
    tasks = {t.label: t for t in load_bundle(root)}
    mc = tasks["mc2_zeroshot"]
    pairs = core.item_pairs(mc, 3, tok)
    item = items["mc2_zeroshot"][3]
    assert [tok.decode(x) for _, x in pairs] == item["choices"]
    assert all(c[0] == tok.bos_id and tok.decode(c) == item["query"] + "\nAnswer: " for c, _ in pairs)

    schema = tasks["schema_fewshot"]
    item = items["schema_fewshot"][5]
    pairs = core.item_pairs(schema, 5, tok)
    assert [tok.decode(x) for _, x in pairs] == [" It ran away."] * 2
    assert [tok.decode(c).endswith(o) for (c, _), o in zip(pairs, item["context_options"], strict=True)] == [True, True]

    lm = tasks["lm_zeroshot"]
    ((c, x),) = core.item_pairs(lm, 0, tok)
    assert tok.decode(c) == "Counting for lm_zeroshot item 0:" and tok.decode(x) == "0 1 2"


def test_fewshot_examples_are_other_items_with_their_answers(bundle):
    root, items = bundle
    tok = ByteTokenizer()
    task = next(t for t in load_bundle(root) if t.label == "mc4_fewshot")
    for i in range(N_ITEMS):
        context = tok.decode(core.item_pairs(task, i, tok)[0][0])
        shots = context.split("\n\n")
        assert len(shots) == 3  # two solved examples, then the query
        others = [gold_text("multiple_choice", " ", it) for j, it in enumerate(items["mc4_fewshot"]) if j != i]
        assert all(s in others for s in shots[:2]) and shots[0] != shots[1]
        assert shots[2] == items["mc4_fewshot"][i]["query"] + " "
        assert core.item_pairs(task, i, tok) == core.item_pairs(task, i, tok)  # deterministic
    for n, index, k in [(10, 0, 3), (10, 9, 9), (3, 1, 5), (1, 0, 2)]:
        drawn = core.fewshot_indices(n, index, k)
        assert len(drawn) == min(k, n - 1) == len(set(drawn))
        assert index not in drawn and all(0 <= j < n for j in drawn)


def test_ranks_split_items_and_max_per_task(bundle):
    root, items = bundle
    tok, tasks = ByteTokenizer(), load_bundle(root)
    scorer = oracle_scorer(tok, all_golds(items))
    seen = []

    def recording(pairs):
        seen.append(tok.decode(pairs[0][0] + pairs[0][1]))
        return scorer(pairs)

    parts = [core.evaluate_tasks(tasks, tok, recording, Runtime(CPU.device, None, rank=r, world_size=3))
             for r in range(3)]
    assert len(seen) == len(set(seen)) == len(TASKS) * N_ITEMS  # every item once, on one rank
    assert sum(p["tasks"]["mc4_fewshot"]["n"] for p in parts) == N_ITEMS

    subset = core.evaluate_tasks(tasks, tok, scorer, CPU, max_per_task=4)
    assert all(r["n"] == 4 for r in subset["tasks"].values())
    assert subset["core"] == 1.0


@pytest.mark.parametrize("breakage, message", [
    (lambda root: (root / "core.yaml").unlink(), "core.yaml is missing"),
    (lambda root: (root / "eval_meta_data.csv").unlink(), "eval_meta_data.csv is missing"),
    (lambda root: (root / "eval_data" / "sub" / "lm_zeroshot.jsonl").unlink(), "lm_zeroshot.jsonl is missing"),
    (lambda root: (root / "core.yaml").write_text("icl_tasks: [unclosed"), "not valid YAML"),
    (lambda root: (root / "core.yaml").write_text("icl_tasks: []\n"), "lists no tasks"),
    (lambda root: _edit(root / "core.yaml", "icl_task_type: schema", "icl_task_type: generation"),
     "icl_task_type 'generation'"),
    (lambda root: _edit(root / "eval_meta_data.csv", "schema_fewshot,", "renamed,"), "has no row"),
    (lambda root: _edit(root / "eval_meta_data.csv", ",25.0", ",n/a"), "not a number"),
    (lambda root: _append(root / "eval_data" / "sub" / "mc4_fewshot.jsonl", '{"query": "q", "choic'),
     "mc4_fewshot.jsonl:11: not a JSON object"),
    (lambda root: _append(root / "eval_data" / "sub" / "mc2_zeroshot.jsonl",
                          '{"query": "q", "choices": ["a", "b"], "gold": 2}'), "gold 2 is not an index"),
    (lambda root: _append(root / "eval_data" / "sub" / "schema_fewshot.jsonl", '{"continuation": "c", "gold": 0}'),
     "missing context_options"),
])
def test_bad_bundles_fail_with_a_clear_message(tmp_path, breakage, message):
    write_bundle(tmp_path)
    breakage(tmp_path)
    with pytest.raises(NanochatError, match=message):
        load_bundle(tmp_path)


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(NanochatError, match="not a folder.*core.yaml"):
        load_bundle(tmp_path / "nope")


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _append(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    texts = []
    for n, (label, (kind, *_)) in enumerate(TASKS.items()):
        texts += [json.dumps(item) for item in make_items(label, kind, seed=n)]
    tok = Tokenizer.train(texts, 300)
    torch.manual_seed(0)
    return GPT(ModelConfig(depth=1, aspect_ratio=32, head_dim=32, sequence_len=64), tok.vocab_size), tok


def test_model_scorer_matches_the_model_loss(tiny_model_and_tokenizer):
    """Each pair's mean loss is the model's own loss on its continuation, alone or padded in a batch;
    an over-long pair loses its left end."""
    model, _ = tiny_model_and_tokenizer
    model.eval()
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 250, (n_ctx,), generator=g).tolist(),
              torch.randint(0, 250, (n_cont,), generator=g).tolist())
             for n_ctx, n_cont in [(5, 3), (20, 1), (1, 7), (70, 4)]]
    losses, greedy = core.model_scorer(model, CPU)(pairs)
    for (context, continuation), loss, match in zip(pairs, losses, greedy, strict=True):
        ids = torch.tensor(context + continuation)[-64:]
        x, y = ids[None, :-1], ids[None, 1:].clone()
        y[0, :len(ids) - 1 - len(continuation)] = -1
        with torch.no_grad():
            assert loss == pytest.approx(model(x, y).item(), rel=1e-4)
            predicted = model(x)[0, -len(continuation):].argmax(-1)
        assert match == bool((predicted == ids[-len(continuation):]).all())
        alone, _ = core.model_scorer(model, CPU)([(context, continuation)])
        assert alone[0] == pytest.approx(loss, rel=1e-4)


def test_model_scorer_greedy_match():
    """A model that always predicts token 7: it reproduces a continuation of 7s and nothing else."""
    class Sevens(torch.nn.Module):
        config = SimpleNamespace(sequence_len=32)

        def forward(self, idx):
            return F.one_hot(torch.full_like(idx, 7), 16).float() * 10

    _, greedy = core.model_scorer(Sevens(), CPU)([([1, 2], [7, 7]), ([1], [7, 3]), ([1, 2, 3], [7])])
    assert greedy == [True, False, True]


def test_evaluate_core_with_a_tiny_gpt(bundle, tiny_model_and_tokenizer):
    root, _ = bundle
    model, tok = tiny_model_and_tokenizer
    model.train()
    result = core.evaluate_core(model, tok, root, CPU)
    assert model.training  # restored
    assert set(result["tasks"]) == set(TASKS)
    for label, r in result["tasks"].items():
        assert r["n"] == N_ITEMS and 0 <= r["accuracy"] <= 1 and math.isfinite(r["centered"]), label
    assert math.isfinite(result["core"])
