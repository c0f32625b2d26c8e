"""Where MedCompress keeps the user's data: demo data, the scratch folders of jobs, the audit log.

One root, ``$MEDCOMPRESS_HOME`` when set (tests point it at a temporary folder), else the
XDG data folder. Nothing here is ever sent anywhere.
"""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    explicit = os.environ.get("MEDCOMPRESS_HOME")
    if explicit:
        root = Path(explicit)
    else:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        root = Path(base) / "medcompress"
    root.mkdir(parents=True, exist_ok=True)
    return root


def scratch_root() -> Path:
    path = data_root() / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_root() -> Path:
    return data_root() / "demo"
