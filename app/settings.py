"""User settings (recent files, last folders, wizard choices) in an INI file under the data root."""
from __future__ import annotations

from PySide6.QtCore import QSettings

from app.paths import data_root

MAX_RECENT = 10


def app_settings() -> QSettings:
    return QSettings(str(data_root() / "settings.ini"), QSettings.Format.IniFormat)


def recent_paths() -> list[str]:
    value = app_settings().value("recent/paths", [])
    if isinstance(value, str):   # QSettings returns a lone string for a one-item list
        value = [value]
    return [str(v) for v in (value or [])]


def remember_path(path: str) -> list[str]:
    paths = [path] + [p for p in recent_paths() if p != path]
    paths = paths[:MAX_RECENT]
    settings = app_settings()
    settings.setValue("recent/paths", paths)
    settings.sync()
    return paths
