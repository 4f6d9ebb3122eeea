"""Questions and answers built from the offline Wikipedia summaries (English, Spanish, French).

Each article gives one conversation, asked in the article's own language: "What is X?" /
"Who was X?" / "Tell me about X" answered with the summary's first sentence (two when the
first is short), and, half of the time, one or two follow-ups: "Tell me more" (the next
sentences), "Which field is that in?" (the article's topic) and "Sum it up in a few words"
(its short description). The phrasing drawn for each article depends on the seed.

The held-out split is the corpus's own (`offline.is_validation`): its articles are not in
pretraining's training shards, so answers to them measure recall of text the model never
trained on, not memorisation. `wiki_eval_items` gives such questions with reference answers;
tasks/wiki_mc.py asks about the same articles as multiple choice.
"""

from __future__ import annotations

import functools
import re

from nanochat.data.offline import is_validation, load_articles
from nanochat.tasks.base import Task, check_split, rng

PEOPLE_TOPICS = {"People", "Personas", "Personnalités"}
NO_TOPIC = {"", "Uncategorized"}
_DIED = re.compile(r"\d{3,4}\s*[–-]\s*\d{1,4}")  # "(1906–2005)": a life span, so "was"
_SENTENCE_END = re.compile(r"[.!?…]+[\"»”)]?\s+")
_ABBREVIATIONS = {"st", "dr", "mr", "mrs", "ms", "jr", "sr", "vs", "etc", "ca", "c", "no", "nº", "approx",
                  "inc", "ltd", "co", "mt", "ft", "gen", "col", "lt", "prof", "rev", "fig", "vol", "av", "sra",
                  "sta", "sto", "mme", "mlle", "m", "p", "pp", "e.g", "i.e", "cf", "op", "aprox", "núm", "s"}

ASK = {
    "en": {"person": ("Who {is} {title}?", "Tell me about {title}.", "What do you know about {title}?",
                      "Who {is} {title}?", "Can you tell me who {title} {is}?"),
           "thing": ("What is {title}?", "Tell me about {title}.", "What do you know about {title}?",
                     "Can you explain what {title} is?", "Give me a short summary of {title}.",
                     "What is {title}?")},
    "es": {"person": ("¿Quién {is} {title}?", "Háblame de {title}.", "¿Qué sabes sobre {title}?"),
           "thing": ("¿Qué es {title}?", "Háblame de {title}.", "¿Qué sabes sobre {title}?",
                     "Explícame qué es {title}.")},
    "fr": {"person": ("Qui {is} {title} ?", "Parle-moi {de}{title}.", "Que sais-tu sur {title} ?"),
           "thing": ("C'est quoi, {title} ?", "Parle-moi {de}{title}.", "Que sais-tu sur {title} ?",
                     "Explique-moi ce qu'est {title}.")},
}
IS = {"en": ("is", "was"), "es": ("es", "fue"), "fr": ("est", "était")}
MORE = {"en": ("Tell me more.", "Can you tell me more?", "Go on.", "What else?"),
        "es": ("Cuéntame más.", "¿Qué más?", "Sigue."),
        "fr": ("Dis-m'en plus.", "Et encore ?", "Continue.")}
FIELD = {"en": (("Which field is that in?", "What topic does that belong to?", "What area is that?"),
                ('It belongs to the topic "{topic}".', 'That falls under "{topic}".')),
         "es": (("¿A qué campo pertenece?", "¿De qué tema es?"), ("Pertenece al tema «{topic}».",)),
         "fr": (("Dans quel domaine ?", "Ça relève de quel thème ?"), ("Cela relève du thème « {topic} ».",))}
SHORT = {"en": ("Can you sum that up in a few words?", "Describe it in a few words.", "In short?"),
         "es": ("¿Puedes resumirlo en pocas palabras?", "¿En pocas palabras?"),
         "fr": ("Tu peux résumer en quelques mots ?", "En bref ?")}


def sentences(text: str) -> list[str]:
    """Split a summary into sentences: at . ! ? followed by a space and a capital letter, a digit
    or an opening mark, except after an initial ("J. R. R.") or a common abbreviation."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        following = text[m.end():m.end() + 1]
        word = text[start:m.start()].rsplit(None, 1)[-1].lstrip("(\"«“") if text[start:m.start()].strip() else ""
        if not following or following.islower() or (len(word) == 1 and word.isalpha()):
            continue
        if word.lower() in _ABBREVIATIONS or re.fullmatch(r"(?:\w\.)+\w", word):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


@functools.cache
def articles(split: str) -> tuple[dict, ...]:
    """The offline corpus's articles of one split ("train" or "val"), in the corpus's order."""
    return tuple(a for a in load_articles() if is_validation(a) == (split != "train"))


def _lang(article: dict) -> str:
    return article["lang"][:2]


def ask(article: dict, r) -> str:
    """A question about the article, in its language."""
    lang, title = _lang(article), article["title"]
    person = article["topic"] in PEOPLE_TOPICS
    template = r.choice(ASK[lang]["person" if person else "thing"])
    is_ = IS[lang][1 if person and _DIED.search(article["description"]) else 0]
    de = "d'" if title[:1].lower() in "aeiouyhàâéèêëîïôûœ" else "de "
    return template.replace("{is}", is_).replace("{de}", de).replace("{title}", title)


def first_answer(parts: list[str]) -> tuple[str, int]:
    """The first sentence, or the first two when the first is short; and how many were used."""
    used = 2 if len(parts) > 1 and len(parts[0]) < 100 else 1
    return " ".join(parts[:used]), used


def conversation(article: dict, r) -> dict:
    lang, parts = _lang(article), sentences(article["text"])
    answer, used = first_answer(parts)
    turns = [(ask(article, r), answer)]
    follow_ups = []
    if len(parts) > used:
        follow_ups.append((r.choice(MORE[lang]), " ".join(parts[used:used + 2])))
    if article["topic"] not in NO_TOPIC:
        questions, answers = FIELD[lang]
        follow_ups.append((r.choice(questions), r.choice(answers).format(topic=article["topic"])))
    description = article["description"].replace("\xa0", " ").strip()
    if description:
        description = description[0].upper() + description[1:]
        follow_ups.append((r.choice(SHORT[lang]), description if description[-1] in ".!?" else description + "."))
    if follow_ups and r.random() < 0.5:
        turns += r.sample(follow_ups, min(len(follow_ups), r.choice((1, 2))))
    messages = []
    for question, reply in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


class WikiTask(Task):
    """One conversation per article of the split (see the module docstring)."""

    name = "wiki"

    def __init__(self, split: str = "train", seed: int = 0):
        self.split, self.seed = check_split(split), seed
        self.articles = articles(self.split)

    def __len__(self) -> int:
        return len(self.articles)

    def _get(self, i: int) -> dict:
        article = self.articles[i]
        return conversation(article, rng(self.name, self.seed, article["lang"], article["title"]))


def wiki_eval_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (question, reference answer) pairs from held-out articles, chosen by seed: the question
    a user would ask, and the summary sentence(s) a good answer should match."""
    pool = articles("val")
    r = rng("wiki-eval", seed)
    items = []
    for i in r.sample(range(len(pool)), min(n, len(pool))):
        article = pool[i]
        items.append((ask(article, r), first_answer(sentences(article["text"]))[0]))
    return items
