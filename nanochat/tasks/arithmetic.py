"""Arithmetic word problems that teach calculator use.

The assistant does not do the arithmetic in its head: it writes the expression as a tool call
(`<|python_start|>23*17<|python_end|>`, learned), the engine runs it and forces the result
(`<|output_start|>391<|output_end|>`, not learned), and the assistant then states it. The
result in the training data is exactly what `nanochat.calculator.calculate` prints, the function
the engine runs for a tool call.
"""

from __future__ import annotations

from nanochat.calculator import CalculatorError, calculate  # noqa: F401  (re-exported for the tasks)
from nanochat.tasks.base import Task, check_split, in_held_out, rng

VAL_PERCENT = 10


# ---------------------------------------------------------------------------------------------
# Problems

NAMES = ("Anna", "Tom", "Maria", "Li", "Omar", "Sara", "Ken", "Priya", "Lucas", "Emma", "Noah", "Aisha",
         "Diego", "Yuki", "Fatima", "Jonas", "Chloe", "Mateo", "Nina", "Ravi")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells",
         "cards", "oranges", "balloons", "toy cars", "beads", "eggs")
LEADS = ("Let me compute that.", "Let me compute that.", "I'll use the calculator.", "Let me calculate that.")
OP_WORDS = {"+": ("plus", "added to"), "-": ("minus",), "*": ("times", "multiplied by"), "/": ("divided by",)}


def _number(r, digits: int) -> int:
    return r.randint(10 ** (digits - 1) if digits > 1 else 2, 10 ** digits - 1)


def _problem(r) -> tuple[str, str]:
    """(question, expression) of one random problem."""
    name, items = r.choice(NAMES), r.choice(ITEMS)
    kind = r.choices(("add", "sub", "mul", "div", "two_step", "bare"), weights=(2, 2, 2, 2, 1, 3))[0]
    if kind == "add":
        a, b = _number(r, r.randint(1, 4)), _number(r, r.randint(1, 3))
        q = r.choice((f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
                      f"A shop sold {a} {items} in the morning and {b} in the afternoon. How many {items} "
                      f"did it sell in total?",
                      f"There are {a} {items} in one box and {b} in another. How many {items} are there "
                      f"altogether?"))
        return q, f"{a}+{b}"
    if kind == "sub":
        b = _number(r, r.randint(1, 3))
        a = b + _number(r, r.randint(1, 3))
        q = r.choice((f"{name} had {a} {items} and gave {b} of them away. How many {items} are left?",
                      f"A box held {a} {items}. {name} took out {b}. How many {items} are still in the box?",
                      f"{name} wants to collect {a} {items} and already has {b}. How many more {items} "
                      f"does {name} need?"))
        return q, f"{a}-{b}"
    if kind == "mul":
        a, b = _number(r, r.randint(1, 2)), _number(r, r.randint(1, 3))
        q = r.choice((f"There are {a} boxes with {b} {items} in each box. How many {items} are there in total?",
                      f"{name} buys {a} packs of {items}, and each pack has {b} {items}. How many {items} "
                      f"does {name} buy?",
                      f"Each of {a} children brings {b} {items}. How many {items} do they bring in all?"))
        return q, f"{a}*{b}"
    if kind == "div":
        b, quotient = r.randint(2, 25), _number(r, r.randint(1, 2))
        a = b * quotient
        q = r.choice((f"{a} {items} are shared equally among {b} friends. How many {items} does each "
                      f"friend get?",
                      f"{name} puts {a} {items} into {b} bags with the same number in each bag. How many "
                      f"{items} go into each bag?",
                      f"{a} {items} are packed in rows of {b}. How many rows are there?"))
        return q, f"{a}/{b}"
    if kind == "two_step":
        a, b, c = _number(r, 1), _number(r, 2), _number(r, r.randint(1, 2))
        q = r.choice((f"{name} has {c} {items} and buys {a} packs of {b} more. How many {items} does "
                      f"{name} have now?",
                      f"A class has {a} tables with {b} {items} on each, plus {c} {items} on the teacher's "
                      f"desk. How many {items} are there?"))
        return q, f"{a}*{b}+{c}"
    op = r.choice("+-*/")
    if op == "/":
        b = r.randint(2, 30)
        a = b * _number(r, r.randint(1, 3))
    else:
        a, b = _number(r, r.randint(1, 4)), _number(r, r.randint(1, 3 if op != "*" else 2))
        if op == "-" and r.random() < 0.8:
            a, b = max(a, b), min(a, b)
    symbol = {"*": "×", "/": "÷"}.get(op, op) if r.random() < 0.3 else op
    q = r.choice((f"What is {a} {r.choice(OP_WORDS[op])} {b}?", f"Compute {a} {symbol} {b}.",
                  f"What's {a} {symbol} {b}?", f"Calculate {a} {r.choice(OP_WORDS[op])} {b}, please."))
    return q, f"{a}{op}{b}"


def conversation(question: str, expression: str, lead: str = LEADS[0]) -> dict:
    """The tool-use conversation for one question: think aloud, call the calculator, answer."""
    result = calculate(expression)
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": [
            {"type": "text", "text": lead},
            {"type": "python", "text": expression},
            {"type": "python_output", "text": result},
            {"type": "text", "text": f"The answer is {result}."},
        ]},
    ]}


class ArithmeticTask(Task):
    """Word problems and bare sums (add, subtract, multiply, exact division, two-step) answered
    with a calculator call. An expression belongs to the held-out split by its hash, so no
    validation problem's expression appears in training."""

    name = "arithmetic"

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None):
        self.split, self.seed = check_split(split), seed
        self.size = size if size is not None else (5000 if self.split == "train" else 500)

    def __len__(self) -> int:
        return self.size

    def _get(self, i: int) -> dict:
        r = rng(self.name, self.split, self.seed, i)
        while True:  # draw until the problem's expression falls in this split
            question, expression = _problem(r)
            if in_held_out(expression, VAL_PERCENT) == (self.split != "train"):
                return conversation(question, expression, r.choice(LEADS))
