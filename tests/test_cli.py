import json
import subprocess
import sys

from nanochat.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nanochat.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_info_json_reports_versions_devices_and_home(tmp_path, monkeypatch):
    import os

    env = {**os.environ, "NANOCHAT_HOME": str(tmp_path / "home")}
    proc = run_cli("info", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    import torch

    assert info["torch"] == torch.__version__
    assert info["home"] == str(tmp_path / "home")
    assert info["home_free_gib"] > 0
    assert info["torchrun"] is None
    assert any(d["type"] == "cpu" for d in info["devices"])
    from nanochat.runtime import pick_device, pick_dtype

    assert info["default_dtype"] == str(pick_dtype(pick_device()) or torch.float32).removeprefix("torch.")
    assert info["default_dtype"] in ("bfloat16", "float32")


def test_info_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "NANOCHAT_HOME" in out and "torch" in out


def test_unknown_command_suggests_a_fix(capsys):
    assert main(["infoo"]) == 2
    assert "did you mean 'info'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "info" in capsys.readouterr().out
