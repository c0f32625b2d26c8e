"""The audit log: one JSON object per line, appended, never rewritten.

Every compression run, export and accepted variant adds a line, so a reviewer can later see
who produced which model file from which parent, with which recipe, and when. The log lives
at ``$MEDCOMPRESS_HOME/audit.jsonl`` (else the XDG data folder), the same data root as
``app.paths.data_root`` computes; app.core may not import app.paths, so the rule is repeated
here and a test keeps the two in step.
"""
from __future__ import annotations

import getpass
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
# One process may append from several threads; O_APPEND keeps each write whole between processes.
_lock = threading.Lock()


def audit_data_root() -> Path:
    explicit = os.environ.get("MEDCOMPRESS_HOME")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "medcompress"


def audit_log_path() -> Path:
    return audit_data_root() / AUDIT_FILE


def _plain(value: Any) -> Any:
    """JSON for anything a caller passes: paths and other objects become their text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def append_audit(event: str, **fields: Any) -> dict:
    """Append one event (``compress``, ``export``, ``evaluate``, ``accept`` ...) and return it."""
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event,
              "user": _user(), **_plain(fields)}
    line = json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"
    path = audit_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))  # a single write: one whole line or nothing
        finally:
            os.close(fd)
    return record


def read_audit(path: str | os.PathLike | None = None) -> list[dict]:
    """Every event in the log, oldest first; a torn last line (power cut) is skipped."""
    path = Path(path) if path else audit_log_path()
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers; the log still records the event
        return ""
