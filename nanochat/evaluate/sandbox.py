"""Run a Python program from a benchmark (HumanEval's completion + tests) and say whether it passed.

A best-effort sandbox for trusted-ish benchmark code, NOT a security boundary: it stops the
accidents a model's code can cause (an endless loop, a memory blow-up, a fork bomb, deleting or
overwriting files, leaving processes behind), not an adversary, who can get around the Python-level
guard (e.g. through the `posix` module or ctypes). Run untrusted code in a container or VM.

Each program runs in its own interpreter (`python -I`: no user site, no PYTHON* variables) with
  - a fresh temporary directory as its working directory, deleted afterwards;
  - resource limits set before it starts: address space (memory), CPU seconds, file size,
    number of processes, no core dumps;
  - its own session (process group): on a timeout, and after every run, the whole group is
    killed, so a grandchild cannot outlive the run;
  - a prelude run before the code that refuses writes outside the working directory (open, io.open,
    os.open and the os functions that create, delete, rename or change files) and disables process
    creation and signalling (os.system, os.fork, os.exec*, os.spawn*, os.kill, subprocess, ...),
    as well as shutil.rmtree and shutil.move.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAX_OUTPUT_CHARS = 20_000
FILE_SIZE_MB = 16
MAX_PROCESSES = 32  # processes + threads this program may add to those its user already runs
SYNTAX_ERROR_EXIT = 97  # the prelude's exit status when the code does not compile

Status = Literal["passed", "failed", "timeout", "error"]


@dataclass(frozen=True)
class Result:
    passed: bool
    status: Status  # passed: exit 0; failed: an exception or non-zero exit; timeout: killed for time;
    output: str     # error: did not compile, or killed by a signal (memory), or could not start


# Runs in the child before the user's code: read the program, install the guard, run the program as
# __main__. The guard only wraps Python-level entry points (see the module docstring).
PRELUDE = r'''
import builtins, io, os, sys
_root = os.path.realpath(os.getcwd())
with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()

def _inside(path):
    if isinstance(path, int):  # an already open file descriptor
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == _root or real.startswith(_root + os.sep)

def _check(path, what):
    if not _inside(path):
        raise PermissionError(f"sandbox: {what} outside the working directory is not allowed: {path!r}")

def _guard_paths(module, name, n_paths):
    original = getattr(module, name, None)
    if original is None:
        return
    def guarded(*args, **kwargs):
        if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            raise PermissionError(f"sandbox: {name} with dir_fd is not allowed")
        for path in list(args[:n_paths]) + [kwargs[k] for k in ("path", "src", "dst") if k in kwargs]:
            _check(path, name)
        return original(*args, **kwargs)
    setattr(module, name, guarded)

def _disable(module, name):
    if hasattr(module, name):
        def disabled(*args, **kwargs):
            raise PermissionError(f"sandbox: {module.__name__}.{name} is disabled")
        setattr(module, name, disabled)

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _check(file, "writing")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
def _guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE:
        if dir_fd is not None:
            raise PermissionError("sandbox: os.open for writing with dir_fd is not allowed")
        _check(path, "writing")
    return _os_open(path, flags, mode, dir_fd=dir_fd)
os.open = _guarded_os_open

for _name, _n in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("mkdir", 1), ("makedirs", 1),
                  ("rename", 2), ("renames", 2), ("replace", 2), ("link", 2), ("symlink", 2), ("chmod", 1),
                  ("chown", 1), ("lchown", 1), ("truncate", 1), ("utime", 1), ("mkfifo", 1), ("mknod", 1)]:
    _guard_paths(os, _name, _n)
for _name in ["system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid", "setpgrp", "chdir",
              "fchdir", "chroot", "posix_spawn", "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv",
              "execve", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
              "spawnvp", "spawnvpe", "putenv", "unsetenv"]:
    _disable(os, _name)
import shutil, subprocess
for _name in ["rmtree", "move", "chown"]:
    _disable(shutil, _name)
for _name in ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"]:
    _disable(subprocess, _name)

try:
    _code = compile(_source, "program.py", "exec")
except SyntaxError as _e:
    import traceback
    traceback.print_exception(_e)
    sys.exit(__SYNTAX_ERROR_EXIT__)
del _f, _name, _n
exec(_code, {"__name__": "__main__", "__builtins__": builtins})
'''.replace("__SYNTAX_ERROR_EXIT__", str(SYNTAX_ERROR_EXIT))


def _tasks_of_user(uid: int) -> int:
    """Processes + threads (what RLIMIT_NPROC counts) that `uid` runs now."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue  # the process ended while we looked
    return count


def _limits(timeout_s: float, memory_mb: int):
    """The preexec_fn: the child's resource limits (soft = hard, so the program cannot raise them)."""
    nproc = _tasks_of_user(os.getuid()) + MAX_PROCESSES if os.path.isdir("/proc") else None
    cpu = math.ceil(timeout_s) + 1

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_MB << 20, FILE_SIZE_MB << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def run_program(code: str, timeout_s: float = 5.0, memory_mb: int = 512, guard: bool = True) -> Result:
    """Run `code` as a Python program in the sandbox (see the module docstring) and report how it
    ended, with its stdout and stderr (the first MAX_OUTPUT_CHARS). guard=False leaves out the
    prelude's guard (resource limits, the temporary directory and the process group stay)."""
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "program.py").write_text(code, encoding="utf-8")
        launcher = PRELUDE if guard else PRELUDE.split("def _inside", 1)[0] + (
            "exec(compile(_source, 'program.py', 'exec'), {'__name__': '__main__', '__builtins__': builtins})\n")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        with open(Path(tmp) / "output.txt", "w+b") as out:  # a file, not a pipe: a grandchild holding
            try:                                             # the pipe open cannot stall the wait
                proc = subprocess.Popen([sys.executable, "-I", "-c", launcher], cwd=work, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_limits(timeout_s, memory_mb))
            except OSError as e:
                return Result(False, "error", f"could not start the program: {e}")
            try:
                returncode = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # the program and anything it left running
            if timed_out:
                returncode = proc.wait()
            out.seek(0)
            output = out.read(MAX_OUTPUT_CHARS * 4).decode("utf-8", errors="replace")[:MAX_OUTPUT_CHARS]
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        # SIGKILL without our timeout: the kernel's hard CPU limit
        return Result(False, "timeout", output + f"\n[sandbox: time limit of {timeout_s:g}s exceeded]")
    if returncode == 0:
        return Result(True, "passed", output)
    if returncode < 0 or returncode == SYNTAX_ERROR_EXIT:
        why = f"killed by signal {signal.Signals(-returncode).name}" if returncode < 0 else "syntax error"
        return Result(False, "error", output + f"\n[sandbox: {why}]")
    return Result(False, "failed", output)
