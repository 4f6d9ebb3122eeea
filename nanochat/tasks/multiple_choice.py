"""Multiple-choice conversations: the one rendering that MMLU, ARC and wiki_mc share.

The user sees the question and lettered choices; the assistant answers with the letter alone,
which is also how a chat evaluation scores it (the likeliest valid letter, evaluate/chat.py).
Each conversation carries, beside its messages, `choices` (the texts, in the order lettered) and
`answer` (the index of the right one), so that scoring never has to parse the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanochat.tasks.base import Task, TaskError

LETTERS = "ABCDEFGHIJ"

# (question, choices, index of the right choice, subject or "")
MCRow = tuple[str, list[str], int, str]


def multiple_choice(question: str, choices: Sequence[str], answer: int, subject: str = "") -> dict:
    """The conversation of one question; `subject` ("high_school_physics") names its topic."""
    if not 0 <= answer < len(choices) <= len(LETTERS):
        raise TaskError(f"a multiple-choice question with {len(choices)} choices has answer index {answer} "
                        f"(at most {len(LETTERS)} choices)")
    topic = f" about {subject.replace('_', ' ')}" if subject else ""
    lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS[:len(choices)], choices, strict=True))
    prompt = (f"Here is a multiple-choice question{topic}.\n\n{question.strip()}\n\n{lines}\n\n"
              f"Answer with the letter of the correct choice.")
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": LETTERS[answer]}],
            "choices": list(choices), "answer": answer}


class MultipleChoiceTask(Task):
    """A task whose questions are held as `rows` (MCRow), each rendered by `multiple_choice`
    when asked for, so that a caller changing a conversation cannot change the task."""

    rows: Sequence[MCRow] = ()

    def __len__(self) -> int:
        return len(self.rows)

    def _get(self, i: int) -> dict:
        return multiple_choice(*self.rows[i])
