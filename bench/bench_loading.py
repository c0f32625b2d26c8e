"""Loading a 300-slice 512x512 uncompressed CT series: MedCompress vs SimpleITK vs pydicom.

Every method runs in a fresh Python process (imports done before the clock starts), on the
same files, in the same run, and the script prints ratios against the faster baseline:

- throughput: headers + pixels into one HU array (warm page cache; cold too, by evicting the
  files from the page cache with posix_fadvise(DONTNEED), or drop_caches when root may);
- first slice: time until the viewer's first slice is in memory, from an index already built
  (the browser has indexed the folder before the user opens a series), and from nothing;
- peak memory: the process's peak RSS growth during the load, against the volume's bytes.

    python bench/bench_loading.py [--dir SERIES_FOLDER] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("medcompress", "simpleitk", "pydicom")


# ------------------------------------------------------------------ inside one process

def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM of this process only
    except OSError:
        pass


def _load_medcompress(folder: str):
    from app.core.dicom_index import index_path
    from app.core.dicom_load import load_series
    from app.core.progress import run_to_end

    (series,) = run_to_end(index_path(folder)).image_series()
    return run_to_end(load_series(series)).voxels


def _load_simpleitk(folder: str):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    image = reader.Execute()
    _KEEP.append(image)  # a view is only valid while its image lives; a copy would add memory
    return sitk.GetArrayViewFromImage(image)


_KEEP: list = []


def _load_pydicom(folder: str):
    """The loop most scripts use: read every file, sort by position, stack, rescale."""
    import numpy as np
    import pydicom

    slices = [pydicom.dcmread(os.path.join(folder, f)) for f in os.listdir(folder)]
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    slices.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, float)))
    volume = np.stack([ds.pixel_array for ds in slices]).astype(np.int16)
    volume += np.int16(int(slices[0].RescaleIntercept))
    return volume


def _first_slice(folder: str) -> dict:
    from app.core.dicom_index import index_path
    from app.core.dicom_load import open_series
    from app.core.progress import run_to_end

    t0 = time.perf_counter()
    (series,) = run_to_end(index_path(folder)).image_series()
    t1 = time.perf_counter()
    loader = open_series(series)
    t2 = time.perf_counter()
    assert loader.volume.loaded[loader.first_slice]
    return {"index_s": t1 - t0, "open_s": t2 - t1}


def run_one(method: str, folder: str) -> dict:
    import numpy as np  # noqa: F401 - import cost stays outside the clock

    if method == "first-slice":
        return _first_slice(folder)
    load = {"medcompress": _load_medcompress, "simpleitk": _load_simpleitk,
            "pydicom": _load_pydicom}[method]
    if method == "medcompress":
        import app.core.dicom_load  # noqa: F401
    elif method == "simpleitk":
        import SimpleITK  # noqa: F401
    else:
        import pydicom  # noqa: F401
    rss_before = _memory_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    voxels = load(folder)
    seconds = time.perf_counter() - t0
    peak = _memory_kib("VmHWM")
    return {"seconds": seconds, "peak_growth_bytes": (peak - rss_before) * 1024,
            "volume_bytes": int(voxels.nbytes), "shape": list(voxels.shape),
            "checksum": float(voxels.astype("float64").sum())}


# ------------------------------------------------------------------------ the driver

def evict(folder: str) -> str:
    """Drop the series' files from the page cache; says how."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fp:
            os.sync()
            fp.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) per file"


def in_fresh_process(method: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", method, "--dir", folder],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_series(folder: str) -> None:
    from app.core.dicom_fixtures import SeriesSpec, write_ct_series

    spec = SeriesSpec(shape=(300, 512, 512), pixel_spacing=(0.7, 0.7), slice_step=1.25,
                      shuffle_names=True, description="Benchmark chest")
    write_ct_series(folder, spec, keep_pixels=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="an uncompressed CT series folder (default: generate one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.dir)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        folder = args.dir or os.path.join(tmp, "series")
        if not args.dir:
            t0 = time.perf_counter()
            write_series(folder)
            print(f"wrote 300 x 512x512 slices in {time.perf_counter() - t0:.1f} s")
        report(folder, args.repeats)


def report(folder: str, repeats: int) -> None:
    warm = {m: [] for m in METHODS}
    cold = {m: [] for m in METHODS}
    for m in METHODS:
        in_fresh_process(m, folder)  # warms the page cache and the interpreter's file cache
    for _ in range(repeats):
        for m in METHODS:
            warm[m].append(in_fresh_process(m, folder))
    how = ""
    for _ in range(max(1, repeats - 1)):
        for m in METHODS:
            how = evict(folder)
            cold[m].append(in_fresh_process(m, folder))
    first = [in_fresh_process("first-slice", folder) for _ in range(repeats)]
    _print(warm, cold, how, first)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _print(warm, cold, how, first) -> None:
    ref = warm["medcompress"][0]
    same = all(r["checksum"] == ref["checksum"] for runs in warm.values() for r in runs)
    mb = ref["volume_bytes"] / 2**20
    print(f"volume {ref['shape']} int16 = {mb:.0f} MiB; all methods give the same voxels: {same}")
    for label, runs in (("warm cache", warm), (f"cold cache ({how})", cold)):
        times = {m: _median(runs[m], "seconds") for m in METHODS}
        best_baseline = min(times["simpleitk"], times["pydicom"])
        print(f"\n{label}: median seconds for the whole volume (headers + pixels)")
        for m in METHODS:
            print(f"  {m:<12} {times[m]:7.3f} s  {mb / times[m]:7.0f} MiB/s")
        print(f"  throughput ratio vs the faster baseline: {best_baseline / times['medcompress']:.2f}x"
              " (target >= 2x)")
    print("\npeak RSS growth during the load / volume bytes (warm runs, median)")
    for m in METHODS:
        ratio = _median(warm[m], "peak_growth_bytes") / ref["volume_bytes"]
        print(f"  {m:<12} {ratio:5.2f}x" + ("  (target <= 1.3x)" if m == "medcompress" else ""))
    print("\nfirst slice shown (median): "
          f"open_series from the index {_median(first, 'open_s') * 1000:.0f} ms (target <= 300 ms);"
          f" indexing the folder first adds {_median(first, 'index_s') * 1000:.0f} ms")


if __name__ == "__main__":
    main()
