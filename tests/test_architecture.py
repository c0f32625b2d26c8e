"""The layer rules of DESIGN.md, checked with import-linter, and the GUI process's imports."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_every_app_service_module_is_named_in_the_contracts():
    """app.core may import no other part of app: every sibling module must be on the list."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    siblings = {f"app.{p.stem}" for p in (ROOT / "app").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and p.name not in ("core", "__pycache__"))}
    for source in ("app.core", "compression"):
        contract = next(c for c in contracts if c["source_modules"] == [source])
        missing = siblings - set(contract["forbidden_modules"])
        assert not missing, f"add these to the {source} contract in pyproject.toml: {sorted(missing)}"


GUI_SMOKE = textwrap.dedent("""
    import sys
    from PySide6.QtWidgets import QApplication
    app = QApplication([])
    from widgets.application import create_main_window
    from tests.app import job_bodies
    window = create_main_window(app)
    window.show()
    done = []
    window.jobs.finished.connect(lambda j, r: done.append(r))
    window.jobs.submit("count", job_bodies.count_to, 3)
    window.jobs.submit("count in child", job_bodies.count_to, 3, in_process=True)
    window.about_text()
    from PySide6.QtCore import QElapsedTimer
    timer = QElapsedTimer(); timer.start()
    while len(done) < 2 and timer.elapsed() < 60000:
        app.processEvents()
    window.close()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "monai"))
    print("JOBS", len(done))
    print("HEAVY", ",".join(heavy))
""")


def test_gui_process_never_imports_torch_or_onnxruntime(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", MEDCOMPRESS_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", GUI_SMOKE], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in result.stdout.splitlines())
    assert lines.get("JOBS") == "2", result.stdout + result.stderr
    assert lines.get("HEAVY", "") == "", f"the GUI process imported: {lines['HEAVY']}"
