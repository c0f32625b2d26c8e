"""The command line: help lists the commands; no display gives advice, not a Qt abort."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def test_help_lists_the_headless_commands():
    result = _run("--help")
    assert result.returncode == 0
    assert "COMMAND" in result.stdout and "gui" in result.stdout
    assert "Research use only" in result.stdout


def test_without_a_display_it_says_how_to_get_one():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    result = _run(env=env)
    assert result.returncode == 2
    assert "xvfb-run -a python main.py" in result.stderr
    assert "Aborted" not in result.stderr and "qt.qpa" not in result.stderr
