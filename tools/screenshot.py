"""Open MedCompress on a path (or the demo), wait until the series, overlays and findings are in,
and save a screenshot of the whole window. Used for the README's pictures.

    xvfb-run -a .venv/bin/python tools/screenshot.py --path DIR --out docs/screenshot.png [--run-models]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication  # noqa: E402


def wait(app, predicate, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        app.processEvents()
        if predicate():
            return True
        time.sleep(0.01)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", help="folder/zip/DICOMDIR to open (default: the demo study)")
    parser.add_argument("--out", default="docs/screenshot.png")
    parser.add_argument("--run-models", action="store_true", help="run every opened model first")
    parser.add_argument("--models", nargs="*", default=None, help="model cards to open (beside the demo's)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    from widgets.application import create_main_window
    window = create_main_window(app)
    window.resize(1600, 1000)
    window.show()
    session = window.session
    if args.path:
        for card in args.models or []:
            session.open_model(card)
        window.open_path(args.path)
    else:
        session.open_demo()
        for card in args.models or []:  # beside the demo models
            session.open_model(card)
    ok = wait(app, lambda: session.volume is not None and session.volume.is_complete, args.timeout)
    print("volume loaded" if ok else "volume did not load in time")
    wait(app, lambda: window.jobs.active_count() == 0, 60)
    if args.run_models:
        for model in sorted(session.models, key=lambda m: m.task != "segmentation"):
            session.run_model(model)
            wait(app, lambda: window.jobs.active_count() == 0, args.timeout)
    if args.run_models:  # show the segmentation's card and its first lesion, as a reader would look
        panel, viewer = window.workspace.models, window.workspace.viewer
        for row in range(panel.chooser.count()):
            if "unet" in panel.chooser.itemText(row):
                panel.chooser.setCurrentIndex(row)
        if viewer.lesion_list.model.lesions:
            viewer._on_lesion(viewer.lesion_list.model.lesions[0])
    wait(app, lambda: False, 1.0)   # let the last repaints land
    for rec in window.jobs.records():
        print(f"job {rec.name!r}: {rec.state.value} {rec.error}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    window.grab().save(args.out)
    print("saved", args.out)
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
