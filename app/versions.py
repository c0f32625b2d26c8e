"""Versions for the About box and model lineage, read from package metadata.

Reading metadata never imports the package, so the GUI can show torch's and ONNX Runtime's
versions without loading either.
"""
from __future__ import annotations

from importlib import metadata

PACKAGES = ("PySide6-Essentials", "pyqtgraph", "pydicom", "SimpleITK", "highdicom", "numpy",
            "torch", "onnxruntime-gpu", "onnxruntime", "onnx", "monai", "torch-pruning")


def package_versions(names=PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
