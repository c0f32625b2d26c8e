"""Keyboard and mouse conventions of the viewer, as Help → Shortcuts shows them.

Kept beside the code that implements them (slice_view.py) so the two are changed together.
"""
from __future__ import annotations

from html import escape

SHORTCUTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Scroll", [
        ("Mouse wheel", "next / previous slice in the view under the cursor"),
        ("↑ ↓ or ← →", "previous / next slice"),
        ("Page Up / Page Down", "10 slices back / forward"),
        ("Home / End", "first / last slice"),
    ]),
    ("Window / level", [
        ("Right-drag (or Ctrl + left-drag)", "left/right: narrower/wider window; up/down: lower/higher level"),
        ("1  2  3  4  5", "presets: lung W1500 L−600, mediastinum W400 L40, abdomen W350 L40, "
                          "bone W2500 L480, brain W80 L40"),
        ("0", "the window stored in the DICOM"),
    ]),
    ("Zoom and pan", [
        ("Ctrl + wheel, + / −", "zoom in / out"),
        ("Ctrl + right-drag", "zoom"),
        ("Middle-drag (or Shift + left-drag)", "pan"),
        ("F", "fit the image to the view"),
    ]),
    ("Views", [
        ("Left click / drag (Navigate)", "move the crosshair: the other views follow"),
        ("L", "switch between 1×3 and 1×1 of the active view"),
        ("X", "show / hide the crosshair"),
        ("M", "thick-slab MIP on / off (thickness in the toolbar, 10 mm by default)"),
    ]),
    ("Measure", [
        ("R", "ruler: drag to measure a distance in mm"),
        ("O", "ROI: drag an ellipse for mean / SD HU and area in mm²"),
        ("N or Esc", "back to navigate"),
        ("C", "clear the rulers and ROIs of the view"),
    ]),
    ("Lesions and series", [
        ("Click a lesion in the list", "all views jump to the lesion's centre"),
        ("Double-click a series", "open it in the viewer"),
    ]),
]


def shortcuts_text() -> str:
    """Plain text, one shortcut a line (for a terminal or a tooltip)."""
    lines = []
    for section, rows in SHORTCUTS:
        lines.append(section)
        lines.extend(f"  {keys:<36} {action}" for keys, action in rows)
    return "\n".join(lines)


def shortcuts_html() -> str:
    """The same as an HTML table, for Help → Shortcuts."""
    parts = ["<table cellspacing='0' cellpadding='3'>"]
    for section, rows in SHORTCUTS:
        parts.append(f"<tr><td colspan='2'><b>{escape(section)}</b></td></tr>")
        parts.extend(f"<tr><td>{escape(keys)}</td><td>{escape(action)}</td></tr>" for keys, action in rows)
    parts.append("</table>")
    return "".join(parts)
