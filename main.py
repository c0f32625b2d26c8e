"""MedCompress: open scans, run AI models on them, compress the models, compare what changed.

``python main.py [PATH]`` opens the window (on PATH: a DICOM folder, DICOMDIR, zip or file);
``python main.py --demo`` opens it on the bundled demo study; ``python main.py COMMAND ...``
runs the same work headless (``python main.py --help`` lists the commands).
"""
from __future__ import annotations

import argparse
import os
import sys

RESEARCH_NOTICE = "Research use only — not for diagnosis."
NO_DISPLAY_HELP = """\
MedCompress needs a display for its window, and none was found (DISPLAY and WAYLAND_DISPLAY are unset).
  - on a headless machine:  xvfb-run -a python main.py   (or: make run, which does this for you)
  - for a window-less check: QT_QPA_PLATFORM=offscreen python main.py
  - for headless work use a command instead: python main.py --help"""

# Each module registers its own subcommand; imports inside stay lazy, so --help is quick.
CLI_MODULES = (
    ("app.core.demo_data", "add_cli"),
    ("app.core.dicom_index", "add_info_cli"),
    ("app.core.infer_cli", "add_cli"),
    ("app.core.demo_models", "add_cli"),
    ("compression.cli", "add_cli"),
    ("compression.compare_cli", "add_cli"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description=__doc__.split("\n\n")[0] + " " + RESEARCH_NOTICE,
        epilog="With no command, the window opens: python main.py [--demo] [PATH]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gui = commands.add_parser("gui", help="open the window (the default)")
    gui.add_argument("path", nargs="?", help="DICOM folder, DICOMDIR, zip or file to open")
    gui.add_argument("--demo", action="store_true", help="open the demo study with the demo models")
    from importlib import import_module
    for name, register in CLI_MODULES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue   # that part of the application is not in this checkout
        getattr(module, register)(commands)
    return parser


def split_gui_arguments(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``main.py PATH`` and ``main.py --demo`` mean the gui command."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or (argv[0] not in commands.choices and argv[0] not in ("-h", "--help")):
        return ["gui", *argv]
    return argv


def has_display() -> bool:
    if sys.platform != "linux":
        return True
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform and not platform.startswith(("xcb", "wayland")):
        return True   # offscreen, minimal, vnc ... need no display server
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_gui(path: str | None, demo: bool) -> int:
    if not has_display():
        print(NO_DISPLAY_HELP, file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from widgets.application import launch
    return launch(path=path, demo=demo)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(split_gui_arguments(list(sys.argv[1:] if argv is None else argv), parser))
    if args.command == "gui":
        return run_gui(args.path, args.demo)
    handler = getattr(args, "handler", None) or getattr(args, "func")
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
