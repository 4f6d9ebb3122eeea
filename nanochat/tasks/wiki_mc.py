"""wiki_mc: "Which description fits X?" about the offline Wikipedia articles, as multiple choice.

One question per article that has a short description: its own description and DISTRACTORS
others, drawn from articles of the same split and language, in an order drawn from the seed.
The questions are then shuffled as a whole (by seed), so that languages are mixed and the first
n questions are a fair sample. The held-out split is the corpus's own (see tasks/wiki.py): its
articles are not in pretraining's training shards. It needs no download, so it is the offline
multiple-choice evaluation.
"""

from __future__ import annotations

import bisect

from nanochat.tasks.base import check_split, rng
from nanochat.tasks.multiple_choice import MCRow, MultipleChoiceTask
from nanochat.tasks.wiki import articles

DISTRACTORS = 3


def description(article: dict) -> str:
    text = article["description"].replace("\xa0", " ").strip()
    return text[:1].upper() + text[1:]


def questions(pool: tuple[dict, ...], seed: int) -> list[MCRow]:
    """The questions about the articles of `pool` (see the module docstring)."""
    pool = [a for a in pool if a["description"].strip()]
    by_lang: dict[str, list[str]] = {}  # language -> its distinct descriptions, sorted
    for a in pool:
        by_lang.setdefault(a["lang"], []).append(description(a))
    by_lang = {lang: sorted(set(texts)) for lang, texts in by_lang.items()}
    rows = []
    for a in pool:
        r = rng("wiki-mc", seed, a["lang"], a["title"])
        truth, texts = description(a), by_lang[a["lang"]]
        k = bisect.bisect_left(texts, truth)
        others = texts[:k] + texts[k + 1:]  # every other description of the language, still sorted
        if len(others) < DISTRACTORS:
            continue
        choices = r.sample(others, DISTRACTORS) + [truth]
        r.shuffle(choices)
        rows.append((f"Which description fits {a['title']}?", choices, choices.index(truth), ""))
    rng("wiki-mc", seed).shuffle(rows)
    return rows


class WikiMC(MultipleChoiceTask):
    name = "wiki_mc"

    def __init__(self, split: str = "train", seed: int = 0):
        self.split, self.seed = check_split(split), seed
        self.rows = questions(articles(self.split), seed)
