"""Regression guard: PySide6 6.12.0 on CPython 3.11 dropped a reference to None on every void
Qt call, so a long session aborted with "deallocating None". Fail loudly if it comes back."""
from __future__ import annotations

import sys

import pytest
from PySide6.QtWidgets import QLabel

CALLS = 20_000


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None is immortal from CPython 3.12 on")
def test_void_qt_calls_keep_the_refcount_of_none(qtbot):
    label = QLabel()
    qtbot.addWidget(label)
    before = sys.getrefcount(None)
    for i in range(CALLS):
        label.setEnabled(bool(i & 1))      # void C++ calls returning None to Python
        label.setToolTip("x")
    after = sys.getrefcount(None)
    # Unrelated code may take or drop a handful of references; the bug drops one per call.
    assert abs(after - before) < CALLS // 20, (
        f"refcount of None moved by {after - before} over {2 * CALLS} void Qt calls: "
        "this PySide6 build corrupts refcounts (pin pyside6-essentials <6.12)")
