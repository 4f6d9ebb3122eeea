"""Spelling words letter by letter, backwards, and counting a letter in a word.

A model sees tokens, not letters, so "how many r in strawberry" is hard unless it first spells
the word out. Every answer here is worked the same way: spell the word, keep a running count
on the matching letters, then state the total. Words are the plain lowercase ASCII words
(3-12 letters, seen at least 3 times) of the offline Wikipedia corpus; a fixed 10% of them, by
hash, are held out for validation.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

from nanochat.data.offline import load_articles
from nanochat.tasks.base import Task, check_split, in_held_out, rng

VAL_PERCENT = 10
MIN_COUNT = 3
_WORD = re.compile(r"(?<![\w'-])[a-z]{3,12}(?![\w'-])")


@functools.cache
def vocabulary(split: str) -> tuple[str, ...]:
    """The corpus words of one split ("train" or "val"), sorted."""
    counts = Counter()
    for article in load_articles():
        counts.update(_WORD.findall(article["text"]))
    return tuple(sorted(w for w, c in counts.items()
                        if c >= MIN_COUNT and in_held_out(w, VAL_PERCENT) == (split != "train")))


def spelled(word: str) -> str:
    return "-".join(word)


def spell(word: str, r) -> dict:
    question = r.choice((f"How do you spell {word}?", f"Spell the word {word}.",
                         f'Can you spell "{word}" letter by letter?', f"Spell {word} for me.",
                         f"spell {word}", f"What are the letters in {word}?"))
    answer = r.choice((f'"{word}" is spelled {spelled(word)}.', f"{spelled(word)}.",
                       f'Letter by letter, "{word}" is {spelled(word)}.'))
    return _chat(question, answer)


def spell_backwards(word: str, r) -> dict:
    question = r.choice((f"Spell {word} backwards.", f'How is "{word}" spelled in reverse?',
                         f"Write {word} backwards, letter by letter."))
    answer = (f'Forwards, "{word}" is {spelled(word)}. Backwards it is {spelled(word[::-1])}, '
              f'which reads "{word[::-1]}".')
    return _chat(question, answer)


def count_letter(word: str, letter: str, r) -> dict:
    question = r.choice((f"How many '{letter}' are in {word}?", f'How many times does the letter {letter} '
                         f'appear in "{word}"?', f"Count the letter '{letter}' in {word}.",
                         f"How many {letter}'s are there in the word {word}?",
                         f"how many {letter} in {word}"))
    tally, n = [], 0
    for c in word:
        if c == letter:
            n += 1
            tally.append(f"{c} ({n})")
        else:
            tally.append(c)
    times = "time" if n == 1 else "times"
    answer = (f'Let me spell "{word}": {", ".join(tally)}. So the letter \'{letter}\' appears {n} {times} '
              f'in "{word}".')
    return _chat(question, answer)


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


class SpellingTask(Task):
    """Spell a word (35%), spell it backwards (15%) or count one letter in it (50%; the letter
    is in the word 75% of the time, so zero counts are learned too)."""

    name = "spelling"

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None):
        self.split, self.seed = check_split(split), seed
        self.size = size if size is not None else (5000 if self.split == "train" else 500)
        self.words = vocabulary(self.split)

    def __len__(self) -> int:
        return self.size

    def _get(self, i: int) -> dict:
        r = rng(self.name, self.split, self.seed, i)
        word = r.choice(self.words)
        kind = r.choices(("spell", "backwards", "count"), weights=(35, 15, 50))[0]
        if kind == "spell":
            return spell(word, r)
        if kind == "backwards":
            return spell_backwards(word, r)
        absent = sorted(set(string.ascii_lowercase) - set(word))
        letter = r.choice(word) if r.random() < 0.75 or not absent else r.choice(absent)
        return count_letter(word, letter, r)
