"""Screenshot of the viewer on a demo case: 1×3 MPR, ground-truth overlay, lesion list.

Usage: xvfb-run -a .venv/bin/python tools/screenshot_viewer.py CASE_DIR OUT.png [--layout 1x1]
CASE_DIR is a demo case (``main.py demo-data``): CT/ series + nodules.nii.gz beside it.
The CT is read with SimpleITK here so the tool depends only on files, not on the app's loader.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def read_case(case_dir: Path):
    import SimpleITK as sitk

    from app.core.volume import Volume

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(case_dir / "CT")))
    image = reader.Execute()
    voxels = sitk.GetArrayFromImage(image).astype(np.int16)
    volume = Volume(voxels, spacing=tuple(reversed(image.GetSpacing())), origin=image.GetOrigin(),
                    direction=np.asarray(image.GetDirection()).reshape(3, 3),
                    description={"series_description": f"{case_dir.name} demo chest CT", "modality": "CT"})
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "nodules.nii.gz"))).astype(np.uint8)
    return volume, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layout", default="1x3", choices=["1x1", "1x3"])
    parser.add_argument("--size", default="1600x760")
    args = parser.parse_args()
    app = QApplication.instance() or QApplication(sys.argv)
    from app.core.lesions import lesion_table
    from widgets.viewer import ViewerPanel

    volume, labels = read_case(args.case_dir)
    lesions = lesion_table(labels, volume)
    panel = ViewerPanel()
    panel.resize(*(int(v) for v in args.size.split("x")))
    panel.show()
    panel.set_volume(volume)
    panel.add_label_overlay("ground truth", labels, {1: "#2ecc71"}, source="SEG (demo phantom)",
                            label_names={1: "nodule"})
    panel.set_lesions(lesions, source="ground truth")
    if lesions:
        panel.jump_to(*lesions[0].centre_index)
    panel.state.apply_preset(1)
    panel.state.set_layout(args.layout, "axial")
    for _ in range(10):
        app.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    panel.grab().save(str(args.out))
    print(f"{args.out}: {volume.shape} voxels, {len(lesions)} lesions")


if __name__ == "__main__":
    main()
