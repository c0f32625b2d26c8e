"""Indexing 5,000 DICOM files: MedCompress's index vs a plain pydicom header loop.

The files are small CT slices (64x64, 50 series of 100) written with pydicom, each with its
own UIDs. Both methods read the same files in the same run, warm page cache, best of N:

- ours: ``index_path(folder)`` — listing, header reading, duplicate check, grouping into
  patients/studies/series, problem list;
- baseline: ``[dcmread(f, stop_before_pixels=True) for f in files]`` — headers only, no
  grouping (what any indexer must at least do with pydicom).

    python bench/bench_indexing.py [--files 5000] [--repeats 3] [--dir FOLDER]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_files(folder: str, n_files: int, per_series: int = 100) -> None:
    from app.core.dicom_fixtures import SeriesSpec, write_ct_series

    for s in range(max(1, n_files // per_series)):
        spec = SeriesSpec(shape=(per_series, 64, 64), seed=s, series_number=s + 1,
                          patient_id=f"PHANTOM-{s // 5:03d}", description=f"Series {s}")
        write_ct_series(os.path.join(folder, f"S{s:03d}"), spec, keep_pixels=False)


def list_files(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


def time_ours(folder: str) -> tuple[float, int]:
    from app.core.dicom_index import index_path
    from app.core.progress import run_to_end

    t0 = time.perf_counter()
    index = run_to_end(index_path(folder))
    seconds = time.perf_counter() - t0
    return seconds, sum(len(s.files) for s in index.all_series())


def time_pydicom_loop(folder: str) -> tuple[float, int]:
    import pydicom

    t0 = time.perf_counter()
    files = list_files(folder)  # the loop must find the files too
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return time.perf_counter() - t0, len(headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="index this folder instead of generated files")
    args = parser.parse_args()
    import pydicom  # noqa: F401 - both sides start with pydicom imported

    with tempfile.TemporaryDirectory(prefix="bench-indexing-") as tmp:
        folder = args.dir or tmp
        if not args.dir:
            t0 = time.perf_counter()
            write_files(folder, args.files)
            print(f"wrote {args.files} files in {time.perf_counter() - t0:.1f} s")
        n = len(list_files(folder))
        time_ours(folder), time_pydicom_loop(folder)  # warm the page cache
        ours = min(time_ours(folder)[0] for _ in range(args.repeats))
        loop = min(time_pydicom_loop(folder)[0] for _ in range(args.repeats))
        print(f"{n} files, best of {args.repeats}, warm cache")
        print(f"  MedCompress index_path       {ours:6.2f} s  {n / ours:7.0f} files/s"
              "  (target >= 2000 files/s)")
        print(f"  pydicom stop_before_pixels   {loop:6.2f} s  {n / loop:7.0f} files/s")
        print(f"  ratio (ours / loop, files/s) {loop / ours:6.2f}x  (target >= 1x)")


if __name__ == "__main__":
    main()
