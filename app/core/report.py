"""The comparison report: one self-contained HTML file and a PDF, written without a screen.

Both are drawn from one :class:`ReportData` (plain text tables, PNG images), so the two files
say the same thing. Images are rendered with matplotlib's Agg back end, the PDF with its
``PdfPages``: neither needs a display, so the CLI writes reports on a headless machine.

De-identification: a report carries no patient name, ID, birth date, study date or UID. The
builder (:func:`compression.compare.report_data`) names cases "Case 1", "Case 2" … unless asked
otherwise, and the images hold pixels and outlines only — no burned-in text — so the same
scans exported under two patients' names and dates give byte-identical files (no timestamps
either: the PDF's creation date is left out).
"""
from __future__ import annotations

import base64
import html
import io
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from app.core.atomic import atomic_output, write_text_atomic

RESEARCH_NOTICE = "Research use only — not for diagnosis."
ENVIRONMENT_PACKAGES = ("numpy", "scipy", "onnxruntime", "onnxruntime-gpu", "torch", "monai", "pydicom",
                        "highdicom", "SimpleITK", "matplotlib", "PySide6-Essentials")
# Colours shared by the images, the charts and the compare view's legend.
REFERENCE_COLOUR = "#2ecc71"   # voxels only the reference marks
OTHER_COLOUR = "#ff2fd0"       # voxels only the other variant marks
BOTH_COLOUR = "#f1c40f"        # voxels both mark
VARIANT_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
IMAGES_PER_PDF_PAGE = 6
IMAGE_LEGEND = ("Lung window. Green: voxels only the reference marks; magenta: only the compared variant; "
                "yellow: both.")
TABLE_ROWS_PER_PDF_PAGE = 28
LINES_PER_PDF_PAGE = 50   # monospace text lines (a wrapped line counts once: recipes are kept short)
_PNG_METADATA = {"Software": None}   # no version string: the bytes depend on the pixels only


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""


@dataclass
class VariantSection:
    """A variant as the report describes it: its card, lineage and costs."""

    name: str
    role: str  # "reference" or "compared"
    facts: list[tuple[str, str]]  # (field, value): intended use, training data, recipe, sha256 …


@dataclass
class ReportData:
    title: str
    summary: list[str]  # plain sentences at the top
    tables: list[Table]
    charts: list[Figure]
    disagreements: Table
    disagreement_images: list[Figure]
    variants: list[VariantSection]
    environment: list[tuple[str, str]] = field(default_factory=list)
    notice: str = RESEARCH_NOTICE


# ---------------------------------------------------------------- environment


def environment_facts() -> list[tuple[str, str]]:
    """Python, CPU and package versions (from package metadata: nothing heavy is imported)."""
    facts = [("Python", platform.python_version()), ("Machine", platform.machine()), ("CPU", cpu_model())]
    for name in ENVIRONMENT_PACKAGES:
        try:
            facts.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


# ---------------------------------------------------------------- images


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)   # headless; a GUI back end is never needed here
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata=_PNG_METADATA)
    _pyplot().close(fig)
    return buffer.getvalue()


def window_to_grey(pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU → 0..1 grey for a (width, level) window."""
    width, level = window
    low = level - width / 2.0
    return np.clip((np.asarray(pixels, np.float32) - low) / max(width, 1.0), 0.0, 1.0)


def disagreement_png(pixels: np.ndarray, reference: np.ndarray, other: np.ndarray, *,
                     pixel_spacing: tuple[float, float], window: tuple[float, float] = (1500.0, -600.0),
                     centre: tuple[float, float] | None = None, half_size_mm: float = 40.0,
                     ring_mm: float | None = None) -> bytes:
    """One axial slice (rows, cols) in a lung window, cropped round ``centre`` (row, col):
    voxels only the reference marks in green, only the other in magenta, both in yellow; a
    white dashed ring of ``ring_mm`` diameter marks the lesion meant. Pixels and graphics
    only — no text — so nothing identifying can be burned in."""
    grey = window_to_grey(pixels, window)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    ref, oth = np.asarray(reference) > 0, np.asarray(other) > 0
    for mask, colour in ((ref & ~oth, REFERENCE_COLOUR), (oth & ~ref, OTHER_COLOUR), (ref & oth, BOTH_COLOUR)):
        rgb[mask] = 0.35 * rgb[mask] + 0.65 * np.asarray(_rgb(colour))
    rgb, offset = _crop(rgb, centre, pixel_spacing, half_size_mm)
    plt = _pyplot()
    fig = plt.figure(figsize=(2.4, 2.4 * rgb.shape[0] * pixel_spacing[0] / (rgb.shape[1] * pixel_spacing[1])))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, interpolation="nearest", aspect=pixel_spacing[0] / pixel_spacing[1])
    if centre is not None and ring_mm:
        from matplotlib.patches import Ellipse

        radius_mm = ring_mm / 2.0 + 3.0   # a margin, so the ring does not hide the lesion's edge
        ax.add_patch(Ellipse((centre[1] - offset[1], centre[0] - offset[0]), 2 * radius_mm / pixel_spacing[1],
                             2 * radius_mm / pixel_spacing[0], fill=False, edgecolor="white", linewidth=1.0,
                             linestyle=(0, (3, 2))))
    ax.set_axis_off()
    return _png(fig)


def _crop(rgb: np.ndarray, centre, pixel_spacing, half_size_mm: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The square of ``half_size_mm`` round ``centre`` (kept inside the image) and its top-left pixel."""
    if centre is None:
        return rgb, (0, 0)
    half = [max(8, int(round(half_size_mm / s))) for s in pixel_spacing]
    lo = [int(np.clip(round(c) - h, 0, max(0, n - 2 * h))) for c, h, n in zip(centre, half, rgb.shape[:2])]
    return rgb[lo[0]:lo[0] + 2 * half[0], lo[1]:lo[1] + 2 * half[1]], (lo[0], lo[1])


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]


def bar_chart_png(title: str, categories: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
                  errors: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                  y_range: tuple[float, float] | None = None) -> bytes:
    """Grouped bars: one group per category, one bar per series (variant); optional error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 2.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for n, (name, values) in enumerate(series.items()):
        values = np.asarray(values, float)
        yerr = None
        if errors and name in errors:
            low, high = (np.asarray(v, float) for v in errors[name])
            yerr = np.vstack([values - low, high - values])
        ax.bar(x + (n - (len(series) - 1) / 2) * width, np.nan_to_num(values), width, label=name,
               color=VARIANT_COLOURS[n % len(VARIANT_COLOURS)], yerr=yerr, capsize=3)
    ax.set_xticks(x, list(categories))
    ax.set_ylabel(ylabel)   # the title is printed by the page around the chart, not in it
    if y_range is not None:
        ax.set_ylim(*y_range)
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; border-bottom: 1px solid #ccc; padding-bottom: 3px; }
.notice { background: #7a4b00; color: #fff; font-weight: bold; padding: 6px 10px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eee; } .note { color: #555; font-size: 12px; }
.images { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 250px; } figcaption { font-size: 12px; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: middle; }
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    note = f"<p class='note'>{_esc(table.note)}</p>" if table.note else ""
    return f"<h3>{_esc(table.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def _img(figure: Figure, width: str = "") -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    style = f" style='width:{width}'" if width else ""
    return f"<img alt='{_esc(figure.title)}' src='data:image/png;base64,{data}'{style}>"


def _legend() -> str:
    return ("<p class='legend'>Lung window, "
            f"<span style='background:{REFERENCE_COLOUR}'></span>only the reference"
            f"<span style='background:{OTHER_COLOUR}'></span>only the compared variant"
            f"<span style='background:{BOTH_COLOUR}'></span>both</p>")


def _facts_table(facts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts)
    return f"<table>{rows}</table>"


def render_html(data: ReportData) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(data.title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<p class='notice'>{_esc(data.notice)}</p>",
             f"<h1>{_esc(data.title)}</h1>"]
    parts += [f"<p>{_esc(line)}</p>" for line in data.summary]
    parts.append("<h2>Before / after accuracy</h2>")
    parts += [_html_table(t) for t in data.tables]
    parts += [f"<h3>{_esc(c.caption or c.title)}</h3>{_img(c)}" for c in data.charts]
    parts += ["<h2>Disagreements, most serious first</h2>", _html_table(data.disagreements), _legend(),
              "<div class='images'>"]
    parts += [f"<figure>{_img(f, '240px')}<figcaption>{_esc(f.caption or f.title)}</figcaption></figure>"
              for f in data.disagreement_images]
    parts.append("</div><h2>Model variants</h2>")
    for variant in data.variants:
        parts += [f"<h3>{_esc(variant.name)} ({_esc(variant.role)})</h3>", _facts_table(variant.facts)]
    parts += ["<h2>Environment</h2>", _facts_table(data.environment),
              f"<p class='notice'>{_esc(data.notice)}</p></body></html>"]
    return "\n".join(parts) + "\n"


def write_html(data: ReportData, path: str | os.PathLike) -> Path:
    write_text_atomic(path, render_html(data))
    return Path(path)


# ---------------------------------------------------------------- PDF

A4 = (8.27, 11.69)


def _table_page_count(table: Table) -> int:
    return max(1, -(-len(table.rows) // TABLE_ROWS_PER_PDF_PAGE))


def pdf_page_count(data: ReportData) -> int:
    """Pages :func:`write_pdf` writes: summary, the other tables (long ones over several pages),
    charts, disagreements (list pages, then image pages), variants + environment."""
    table_pages = sum(_table_page_count(t) for t in data.tables[1:] + [data.disagreements])
    image_pages = -(-len(data.disagreement_images) // IMAGES_PER_PDF_PAGE)
    variant_pages = -(-len(_variant_lines(data)) // LINES_PER_PDF_PAGE)
    return 1 + table_pages + 1 + image_pages + variant_pages


def write_pdf(data: ReportData, path: str | os.PathLike) -> Path:
    """The same content as the HTML, on A4 pages (matplotlib PdfPages: no display needed)."""
    from matplotlib.backends.backend_pdf import PdfPages

    _pyplot()
    with atomic_output(path) as tmp:
        # No creation date: two exports of the same comparison give the same bytes.
        with PdfPages(tmp, metadata={"Title": data.title, "CreationDate": None}) as pdf:
            for page in _pdf_pages(data):
                pdf.savefig(page)
                _pyplot().close(page)
    return Path(path)


def _pdf_pages(data: ReportData):
    yield _text_page(data.title, [data.notice, ""] + data.summary, data.tables[:1])
    for table in data.tables[1:]:
        yield from _table_pages("Before / after accuracy", table)
    yield _image_page("Charts", data.charts, columns=1, rows=len(data.charts))
    yield from _table_pages("Disagreements, most serious first", data.disagreements)
    for first in range(0, len(data.disagreement_images), IMAGES_PER_PDF_PAGE):
        yield _image_page("Top disagreements", data.disagreement_images[first:first + IMAGES_PER_PDF_PAGE],
                          columns=2, rows=3, subtitle=IMAGE_LEGEND)
    lines = _variant_lines(data)
    for first in range(0, len(lines), LINES_PER_PDF_PAGE):
        yield _text_page("Model variants and environment", lines[first:first + LINES_PER_PDF_PAGE], [])


def _table_pages(title: str, table: Table):
    """One table over as many pages as its rows need (an empty table still gets its page)."""
    rows = table.rows or [["—"] * len(table.columns)]
    for first in range(0, max(1, len(table.rows)), TABLE_ROWS_PER_PDF_PAGE):
        chunk = Table(table.title, table.columns, rows[first:first + TABLE_ROWS_PER_PDF_PAGE], table.note)
        yield _text_page(title, [], [chunk])


def _variant_lines(data: ReportData) -> list[str]:
    """Each variant's card facts and the environment as text lines, already wrapped to the page."""
    import textwrap

    lines = []
    for variant in data.variants:
        lines.append(f"{variant.name} ({variant.role})")
        for key, value in variant.facts:
            lines += textwrap.wrap(f"    {key}: {value}", 105, subsequent_indent="        ") or [""]
        lines.append("")
    lines.append("Environment")
    lines += [f"    {k}: {v}" for k, v in data.environment]
    return [data.notice, ""] + lines


def _new_page(title: str):
    plt = _pyplot()
    fig = plt.figure(figsize=A4)
    fig.text(0.06, 0.965, title, fontsize=13, weight="bold", va="top")
    fig.text(0.06, 0.02, RESEARCH_NOTICE, fontsize=7, color="#7a4b00")
    return fig


def _text_page(title: str, lines: list[str], tables: list[Table]):
    import textwrap

    fig = _new_page(title)
    y = 0.93
    for line in lines:
        for piece in textwrap.wrap(line, 105, subsequent_indent="        ") or [""]:
            fig.text(0.06, y, piece, fontsize=7.5, va="top", family="monospace")
            y -= 0.016
    for table in tables:
        y = _draw_table(fig, table, y - 0.01)
    return fig


def _draw_table(fig, table: Table, top: float) -> float:
    fig.text(0.06, top, table.title, fontsize=9.5, weight="bold", va="top")
    height = 0.018 * (len(table.rows) + 1)
    ax = fig.add_axes((0.06, max(0.04, top - 0.02 - height), 0.88, height))
    ax.set_axis_off()
    if table.rows:
        text = [[str(v) for v in row] for row in table.rows]
        cells = ax.table(cellText=text, colLabels=table.columns, loc="upper left", cellLoc="left",
                         colWidths=_column_widths(table.columns, text))
        cells.auto_set_font_size(False)
        cells.set_fontsize(6.5)
        cells.scale(1.0, 1.0)
    bottom = top - 0.03 - height
    if table.note:
        fig.text(0.06, bottom, table.note, fontsize=6.5, color="#555", va="top", wrap=True)
        bottom -= 0.02
    return bottom - 0.015


def _column_widths(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[float]:
    """Column widths (fractions of the table) in proportion to their longest text."""
    longest = [max([len(str(c)), 5] + [len(row[n]) for row in rows]) + 3 for n, c in enumerate(columns)]
    total = float(sum(longest))
    return [n / total for n in longest]


def _image_page(title: str, figures: Sequence[Figure], columns: int, rows: int, subtitle: str = ""):
    import textwrap

    import matplotlib.image as mpimg

    fig = _new_page(title)
    if subtitle:
        fig.text(0.06, 0.94, subtitle, fontsize=8, va="top")
    rows = max(1, rows)
    top = 0.90 if subtitle else 0.93
    for n, figure in enumerate(figures):
        r, c = divmod(n, columns)
        height = (top - 0.07) / rows
        ax = fig.add_axes((0.06 + c * 0.88 / columns, top - (r + 1) * height + 0.03, 0.88 / columns - 0.02,
                           height - 0.05))
        ax.imshow(mpimg.imread(io.BytesIO(figure.png), format="png"))
        ax.set_axis_off()
        caption = "\n".join(textwrap.wrap(figure.caption or figure.title, 60))
        ax.set_title(caption, fontsize=7.5)
    return fig
