"""The package's layering (DESIGN.md): inference never imports training, data never imports
evaluation or training, and nanochat modules are imported at the top of a module."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanochat"


def loaded_after_import(*modules: str) -> set[str]:
    """The nanochat modules a fresh interpreter has loaded after importing `modules`."""
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nanochat'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", ["nanochat.engine", "nanochat.serve.app", "nanochat.evaluate.cli",
                                    "nanochat.export.cli", "nanochat.chat"])
def test_inference_loads_no_training_module(module):
    loaded = loaded_after_import(module)
    assert module in loaded
    assert not {m for m in loaded if m == "nanochat.train" or m.startswith("nanochat.train.")}


def test_data_loads_neither_evaluation_nor_training():
    loaded = loaded_after_import(*(f"nanochat.data.{p.stem}" for p in (PACKAGE / "data").glob("*.py")))
    assert not {m for m in loaded if m.startswith(("nanochat.evaluate", "nanochat.train"))}


def test_the_checker_sees_a_training_import():
    # The assertion above could pass vacuously if loading missed submodules: a trainer must show up.
    assert "nanochat.train.loop" in loaded_after_import("nanochat.train.pretrain")


def function_level_nanochat_imports(source: str) -> list[int]:
    """Lines of `import nanochat…` / `from nanochat… import` inside a function, without a comment
    on that line or the one above saying why."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            names = ([a.name for a in inner.names] if isinstance(inner, ast.Import)
                     else [inner.module or ""] if isinstance(inner, ast.ImportFrom) and inner.level == 0 else [])
            if any(n == "nanochat" or n.startswith("nanochat.") for n in names):
                here, above = lines[inner.lineno - 1], lines[inner.lineno - 2] if inner.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    found.append(inner.lineno)
    return found


def test_the_import_scan_finds_an_uncommented_function_level_import():
    assert function_level_nanochat_imports("def f():\n    from nanochat.gpt import GPT\n") == [2]
    assert function_level_nanochat_imports("def f():\n    # wandb is optional\n    import nanochat.x\n") == []


def test_nanochat_modules_are_imported_at_module_level():
    offenders = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py"))
                 if (lines := function_level_nanochat_imports(p.read_text()))}
    assert offenders == {}, f"function-level nanochat imports without a comment saying why: {offenders}"
