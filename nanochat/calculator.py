"""The calculator tool: what runs when the model writes `<|python_start|>expr<|python_end|>`.

An AST whitelist evaluator — numbers, parentheses, + - * / // % ** with Python's semantics and
nothing else; never `eval`/`exec`. Limits keep a hostile or confused expression cheap: its length,
nesting depth, exponent and base sizes, result magnitude, and a wall-clock deadline checked at
every node. The printed result is exactly what the chat training data shows after
`<|output_start|>`, so what the model learns is what it will see.
"""

from __future__ import annotations

import ast
import math
import operator
import time
import warnings

from nanochat.errors import NanochatError

# What the model writes is parsed under this file name, so that Python's compile-time warnings
# about it ("invalid decimal literal" for `3x`, …) are silenced here and nowhere else: an
# expression that does not parse is already a CalculatorError, and the model writes many.
SOURCE = "<calculator>"
warnings.filterwarnings("ignore", category=SyntaxWarning, module=SOURCE)

MAX_EXPR_CHARS = 200
MAX_DEPTH = 32
MAX_MAGNITUDE = 1e30
TIME_LIMIT_S = 0.05

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(NanochatError, ValueError):
    """An expression the calculator refuses: not plain arithmetic, too big, too slow, or undefined."""


def _evaluate(node: ast.AST, depth: int, deadline: float) -> int | float:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression nested deeper than {MAX_DEPTH} levels")
    if time.monotonic() > deadline:
        raise CalculatorError(f"expression took longer than {TIME_LIMIT_S} s")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, depth + 1, deadline))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, depth + 1, deadline), _evaluate(node.right, depth + 1, deadline)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise CalculatorError("exponent or base too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
            raise CalculatorError("result out of range")
        return value
    raise CalculatorError(f"not plain arithmetic: {ast.dump(node)[:60]}")


def format_number(value: int | float) -> str:
    """Integers as integers (a whole-number float too: 84/7 prints 12), other numbers rounded
    to 6 decimals without trailing zeros (10/4 prints 2.5, 10/3 prints 3.333333)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            value = int(value)
        else:
            text = f"{value:.6f}".rstrip("0").rstrip(".")
            return "0" if text == "-0" else text
    return str(value)


def calculate(expression: str) -> str:
    """Evaluate a plain arithmetic expression and print the result; CalculatorError otherwise."""
    if len(expression) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), filename=SOURCE, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise CalculatorError(f"cannot parse {expression!r}") from None
    return format_number(_evaluate(tree.body, 0, time.monotonic() + TIME_LIMIT_S))
