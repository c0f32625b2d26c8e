"""Fixtures shared by the whole suite.

Every test runs with ``MEDCOMPRESS_HOME`` in a temporary folder, so no test reads or writes the
user's real data folder. Qt tests run under Xvfb (pytest-xvfb) or offscreen.
"""
from __future__ import annotations

import os
import threading

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("medcompress-home")
    old = os.environ.get("MEDCOMPRESS_HOME")
    os.environ["MEDCOMPRESS_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("MEDCOMPRESS_HOME", None)
    else:
        os.environ["MEDCOMPRESS_HOME"] = old


@pytest.fixture
def job_manager(qtbot):
    """A JobManager that is shut down (all jobs cancelled and waited for) after the test."""
    from app.jobs import JobManager

    manager = JobManager()
    yield manager
    assert manager.shutdown(timeout_ms=20_000), "a job was still running after shutdown"


@pytest.fixture(autouse=True)
def _no_leaked_python_threads():
    """Fail a test that leaves a Python thread running (Qt pool threads are checked by shutdown)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"


# ---------------------------------------------------------------------------- demo data


@pytest.fixture(scope="session")
def demo_tiny(tmp_path_factory):
    """Three tiny synthetic chest CT studies (128×128×32) with ground truth, generated once.

    Layout (see app.core.demo_data): CASE00n/CT/*.dcm, CASE00n/seg.dcm, CASE00n/nodules.nii.gz,
    CASE00n/nodule_instances.nii.gz, CASE00n/lesions.csv, manifest.csv, README.txt. CASE003 has no
    nodule. Treat it as read-only: other tests share it.
    """
    from app.core.demo_data import generate_demo_data
    from app.core.progress import run_to_end

    out = tmp_path_factory.mktemp("demo-tiny")
    run_to_end(generate_demo_data(out, cases=3, seed=0, size="tiny"))
    return out
