"""The `llama2-hf` entry point: every command answers --help, an unknown command or a user error is exit code 2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from llama2_hf.cli import COMMANDS, main
from llama2_hf.stages import STAGES


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name, capsys):
    if name in STAGES and importlib.util.find_spec(STAGES[name]) is None:
        pytest.skip(f"{STAGES[name]} (the `{name}` stage) is not in the tree")
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "llama2_hf.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "quickstart" in proc.stdout


def test_stage_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"llama2-hf sft: error: --config {tmp_path / 'missing.yaml'}: no such file"
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    from llama2_hf.runner import UsageError

    with pytest.raises(UsageError, match="no such file"):
        main(["sft", "--config", str(tmp_path / "missing.yaml"), "--debug"])
