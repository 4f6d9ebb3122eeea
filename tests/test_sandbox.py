"""The HumanEval sandbox: outcomes, the time limit, the write guard, and no process left behind."""

import os
import time
from pathlib import Path

import pytest

from nanochat.evaluate.sandbox import run_program


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (FileNotFoundError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def gone_within(pid: int, limit_s: float = 10.0) -> bool:
    """Whether `pid` is gone within `limit_s` (a limit for a slow machine, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_correct_program_passes_and_its_output_comes_back():
    result = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok', add(1, 1))\n")
    assert result.passed and result.status == "passed"
    assert "ok 2" in result.output


def test_a_failed_assertion_fails():
    result = run_program("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n")
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.output


def test_a_syntax_error_is_an_error_not_a_failure():
    result = run_program("def f(:\n    pass\n")
    assert (result.passed, result.status) == (False, "error")
    assert "SyntaxError" in result.output


def test_an_infinite_loop_is_killed_by_the_timeout():
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")


def test_memory_is_limited():
    result = run_program("x = bytearray(400 << 20)\n", memory_mb=200)
    assert not result.passed and "MemoryError" in result.output


@pytest.mark.parametrize("write", [
    "open({path!r}, 'w').write('x')",
    "import pathlib; pathlib.Path({path!r}).write_text('x')",
    "import os; os.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "open('../escaped.txt', 'w').write('x')",
])
def test_writes_outside_the_working_directory_are_refused(tmp_path, write):
    target = tmp_path / "outside.txt"
    result = run_program(write.format(path=str(target)))
    assert result.status == "failed" and "PermissionError" in result.output
    assert not target.exists()


def test_files_inside_the_working_directory_can_be_written_and_read():
    code = ("import os\nopen('data.txt', 'w').write('hello')\nos.mkdir('sub')\n"
            "open('sub/x.txt', 'w').write('!')\nassert open('data.txt').read() + open('sub/x.txt').read() == 'hello!'\n"
            "os.remove('data.txt')\n")
    assert run_program(code).passed


def test_deleting_outside_the_working_directory_and_running_processes_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in (f"import os; os.remove({str(victim)!r})", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                 "import os; os.system('echo hi')", "import subprocess; subprocess.run(['true'])",
                 "import os; os.fork()"):
        result = run_program(code)
        assert result.status == "failed" and "PermissionError" in result.output, code
    assert victim.read_text() == "precious"


def test_each_run_gets_a_fresh_directory_that_is_removed_afterwards():
    first = run_program("import os\nprint(os.getcwd())\nopen('left.txt', 'w').write('x')\n")
    second = run_program("import os\nprint(os.getcwd())\nassert not os.path.exists('left.txt')\n")
    assert first.passed and second.passed
    assert not Path(first.output.strip()).exists()


SPAWN = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
{after}
"""


@pytest.mark.parametrize("after, status", [("", "passed"), ("while True:\n    pass", "timeout")])
def test_no_grandchild_outlives_the_run(after, status):
    # guard=False so that the program may spawn at all: the process group is what must clean up
    result = run_program(SPAWN.format(after=after), timeout_s=3.0, guard=False)
    assert result.status == status, result.output
    pid = int(result.output.split()[0])
    assert pid != os.getpid()
    assert gone_within(pid)
