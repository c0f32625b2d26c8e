"""Scrolling the viewer: frame time in the 1×3 MPR with a label overlay and the crosshair.

Side by side in one run: a bare pyqtgraph baseline (one ImageItem + one overlay ImageItem, the
same 512×512 slices) and the real ViewerPanel, each scrolled one slice per frame with one
processEvents per frame, as a wheel scroll does, in alternating rounds so that the load other
programs put on the machine falls on both alike; then both again while a CPU-heavy job (numpy
products in a child process, through the JobManager) runs. Also the time from
set_volume to the first slice on screen for a 300-slice series. The stall meter's heartbeat
runs during every scroll.

Run: xvfb-run -a .venv/bin/python bench/bench_viewer_scroll.py [--slices 300 --frames 400]
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

import numpy as np  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

import widgets.viewer  # noqa: E402,F401  (sets pyqtgraph's row-major image order)
import pyqtgraph as pg  # noqa: E402
from app.core.display import label_lut  # noqa: E402
from app.core.volume import Volume  # noqa: E402
from app.jobs import JobManager  # noqa: E402
from app.stall_meter import StallMeter  # noqa: E402
from bench import workloads  # noqa: E402
from widgets.viewer import ViewerPanel  # noqa: E402

SIZE = (1600, 700)


def chest_volume(slices: int, size: int = 512) -> tuple[Volume, np.ndarray]:
    """A 512×512×N chest-like int16 volume and a nodule label map, built by broadcasting (fast)."""
    j, i = np.ogrid[0:size, 0:size]
    body = ((j - size / 2) / (size * 0.42)) ** 2 + ((i - size / 2) / (size * 0.47)) ** 2 < 1
    lungs = (((j - size / 2) / (size * 0.3)) ** 2 + ((i - size * 0.3) / (size * 0.15)) ** 2 < 1) | \
            (((j - size / 2) / (size * 0.3)) ** 2 + ((i - size * 0.7) / (size * 0.15)) ** 2 < 1)
    plane = np.where(body, np.int16(40), np.int16(-1000))
    plane[lungs] = -850
    noise = np.random.default_rng(0).integers(-20, 20, (8, size, size), dtype=np.int16)
    voxels = np.empty((slices, size, size), np.int16)
    for k in range(slices):
        np.add(plane, noise[k % 8], out=voxels[k])
    labels = np.zeros(voxels.shape, np.uint8)
    k, jj, ii = np.ogrid[0:slices, 0:size, 0:size]
    for kc in range(20, slices, 40):  # a nodule every 40 slices
        labels[max(0, kc - 6):kc + 6, 200:260, 120:180] = (
            ((k[max(0, kc - 6):kc + 6] - kc) * 2.5) ** 2 + (jj[:, 200:260] - 230) ** 2 * 0.49
            + (ii[:, :, 120:180] - 150) ** 2 * 0.49 < 100)
    return Volume(voxels, spacing=(1.25, 0.7, 0.7), description={"series_description": "bench"}), labels


def scroll_frames(app, step, frames: int) -> tuple[np.ndarray, object]:
    """Call ``step(n)`` then one processEvents per frame; per-frame ms and the stall stats."""
    meter = StallMeter()
    times = np.empty(frames)
    meter.start()
    for n in range(frames):
        t0 = time.perf_counter()
        step(n)
        app.processEvents()
        times[n] = (time.perf_counter() - t0) * 1000
    return times, meter.stop()


def bouncing(n: int, count: int) -> int:
    """Slice index for frame n: down through the series and back up, as a reader scrolls."""
    period = 2 * (count - 1)
    m = n % period
    return m if m < count else period - m


def bare_baseline(app, volume: Volume, labels: np.ndarray):
    """pyqtgraph alone: grey ImageItem with levels + overlay ImageItem with a colour table.

    Returns (widget, step): ``step(n)`` shows slice n of a bouncing scroll.
    """
    widget = pg.GraphicsLayoutWidget()
    widget.resize(*SIZE)
    view = widget.addViewBox(lockAspect=True, invertY=True)
    grey, overlay = pg.ImageItem(), pg.ImageItem()
    overlay.setLookupTable(label_lut({1: (255, 0, 0)}))
    overlay.setOpacity(0.5)
    view.addItem(grey)
    view.addItem(overlay)
    grey.setImage(volume.voxels[0], levels=(-1350, 150))
    overlay.setImage(labels[0], autoLevels=False)
    widget.show()
    app.processEvents()
    n_slices = volume.shape[0]

    def step(n):
        k = bouncing(n, n_slices)
        grey.setImage(volume.voxels[k], autoLevels=False)
        overlay.setImage(labels[k], autoLevels=False)

    return widget, step


def open_viewer(app, volume: Volume, labels: np.ndarray) -> tuple[ViewerPanel, float]:
    panel = ViewerPanel()
    panel.resize(*SIZE)
    panel.show()
    app.processEvents()
    t0 = time.perf_counter()
    panel.set_volume(volume)
    panel.add_label_overlay("nodules", labels, {1: (230, 25, 75)}, source="bench")
    panel.state.apply_preset(1)
    app.processEvents()  # the three views are painted: the series is scrollable
    return panel, time.perf_counter() - t0


def viewer_step(panel: ViewerPanel, view: str = "axial"):
    shown = panel.mpr.views[view]
    n_slices = shown.scan.canonical.shape[shown.axis]

    def step(n):
        shown.scroll(bouncing(n, n_slices) - shown.slice_index)

    return step


def interleaved(app, steps: dict, frames: int, rounds: int = 8) -> dict:
    """Scroll each contender ``frames`` in total, in alternating rounds, so that the load other
    programs put on the machine falls on all of them alike; per-frame ms and the worst stall."""
    times = {name: [] for name in steps}
    worst_stall = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            t, stalls = scroll_frames(app, step, frames // rounds)
            times[name].append(t)
            worst_stall[name] = max(worst_stall[name], stalls.max_ms)
    return {name: (np.concatenate(times[name]), worst_stall[name]) for name in steps}


def summary(name: str, times: np.ndarray, max_stall_ms: float) -> str:
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return (f"{name:<46} p50 {p50:5.2f}  p95 {p95:5.2f}  p99 {p99:6.2f} ms  "
            f"max {times.max():6.1f} ms  {1000 / times.mean():6.0f} frames/s | max stall {max_stall_ms:5.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--frames", type=int, default=400)
    args = parser.parse_args()
    app = QApplication.instance() or QApplication(sys.argv)
    print(f"platform {app.platformName()}, volume 512×512×{args.slices}, {args.frames} frames per run, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    volume, labels = chest_volume(args.slices)
    bare_widget, bare = bare_baseline(app, volume, labels)
    panel, open_s = open_viewer(app, volume, labels)
    axial, coronal = viewer_step(panel, "axial"), viewer_step(panel, "coronal")
    scroll_frames(app, axial, 30)  # warm-up: first paints, caches
    idle = interleaved(app, {"bare": bare, "axial": axial, "coronal": coronal}, args.frames)
    jobs = JobManager()
    jobs.submit("numpy products (child process)", workloads.numpy_products, 600.0, in_process=True)
    time.sleep(1.0)  # let the child start and load the CPU
    busy = interleaved(app, {"bare": bare, "axial": axial}, args.frames)
    jobs.shutdown(timeout_ms=20_000)
    print(summary("bare pyqtgraph image + overlay (baseline)", *idle["bare"]))
    print(summary("viewer 1×3, overlay + crosshair, axial", *idle["axial"]))
    print(summary("viewer 1×3, overlay + crosshair, coronal", *idle["coronal"]))
    print(summary("bare baseline, CPU job in a child process", *busy["bare"]))
    print(summary("viewer 1×3 axial, CPU job in a child process", *busy["axial"]))

    def p99(result):
        return np.percentile(result[0], 99)

    print(f"p99 frame ratio viewer / bare: {p99(idle['axial']) / p99(idle['bare']):.2f} idle, "
          f"{p99(busy['axial']) / p99(busy['bare']):.2f} with a CPU job")
    print(f"set_volume → scrollable ({args.slices} slices, overlay included): {open_s * 1000:.0f} ms")
    panel.close()
    bare_widget.close()


if __name__ == "__main__":
    main()
