"""The comparison as people read it: tables, bar charts, images of the disagreements, the HTML
and PDF reports, the DICOM SEG/SR exports, and what the compare view shows.

Everything here is built from a :class:`~compression.compare.ComparisonRun`; cases are named
"Case 1", "Case 2" … unless ``identify`` asks for the manifest's names (de-identified by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compression.compare import ComparisonRun


METRIC_TITLES = {
    "dice": "Dice vs ground truth", "hd95_mm": "HD95 vs ground truth (mm)", "sensitivity": "Lesion sensitivity",
    "sensitivity_large": "Sensitivity, lesions ≥ 6 mm", "false_positives_per_case": "False positives per case",
    "fidelity_dice": "Fidelity Dice vs the reference", "lesions_lost": "Lesions lost (total)",
    "lesions_lost_large": "Lesions ≥ 6 mm lost",
    "lesions_lost_large_true": "Lost lesions ≥ 6 mm on a ground-truth nodule",
    "nodules_missed_large": "Nodules ≥ 6 mm the reference detects and this one misses",
    "lesions_gained": "Lesions gained (total)",
    "lesions_gained_large": "Lesions ≥ 6 mm gained", "dice_drop": "Dice drop vs the reference",
    "sensitivity_drop": "Sensitivity drop", "sensitivity_large_drop": "Sensitivity (≥ 6 mm) drop",
}
TOP_IMAGES = 6


def case_labels(run: ComparisonRun, identify: bool = False) -> list[str]:
    """What the report calls each case: "Case 1" … unless the user asks for the manifest's names."""
    return [c.case.case if identify else f"Case {n}" for n, c in enumerate(run.cases, 1)]


def report_data(run: ComparisonRun, *, identify: bool = False, top_images: int = TOP_IMAGES):
    """Everything the HTML and PDF reports show, de-identified unless ``identify``."""
    from app.core.report import ReportData, environment_facts

    labels = case_labels(run, identify)
    evaluation = run.evaluation
    summary = [f"Reference: {run.reference_name}. Compared: {', '.join(run.others)}.",
               f"{len(run.cases)} case(s); evidence: {evaluation.evidence}.",
               f"Disagreements listed: {len(run.all_disagreements())} (volume changes over "
               f"{run.volume_change_pct:g} %)."] + disagreement_counts(run)
    return ReportData(
        title="Model comparison", summary=summary,
        tables=[verdict_table(run), per_case_table(run, labels), cost_table(run)] + classifier_tables(run),
        charts=charts(run, labels), disagreements=disagreement_table(run, labels),
        disagreement_images=disagreement_images(run, labels, top_images),
        variants=[variant_section(run, i) for i in range(len(run.variants))]
        + [classifier_section(run, i) for i in range(len(run.classifiers))],
        environment=environment_facts())


def disagreement_counts(run: ComparisonRun) -> list[str]:
    """One sentence per compared variant: how many of each kind, the merged/split ones apart."""
    from app.core.disagreement import ADDED, CLASS_FLIP, MISSED, VOLUME_CHANGE

    lines = []
    for name in run.others + run.classifier_names[1:]:
        items = [d for case in run.cases for d in case.disagreements.get(name, [])]
        count = {kind: sum(d.kind == kind for d in items) for kind in (MISSED, ADDED, VOLUME_CHANGE, CLASS_FLIP)}
        merged = {kind: sum(d.kind == kind and d.merged for d in items) for kind in (MISSED, ADDED)}
        lines.append(f"{name}: {count[MISSED]} missed ({merged[MISSED]} of them merged into another lesion), "
                     f"{count[ADDED]} added ({merged[ADDED]} split off another), {count[VOLUME_CHANGE]} volume "
                     f"changes, {count[CLASS_FLIP]} type changes.")
    return lines


def verdict_table(run: ComparisonRun):
    from app.core.report import Table

    metrics = [m for m in METRIC_TITLES if any(m in v.verdicts for v in run.evaluation.variants)]
    rows = [[METRIC_TITLES[m]] + [_verdict_text(v.verdicts.get(m), m) for v in run.evaluation.variants]
            for m in metrics]
    if run.evaluation.sufficient:
        return Table("Whole set", ["Measure"] + run.names, rows,
                     "Point estimate [paired-bootstrap 95 % interval over cases].")
    return Table("Whole set — insufficient evidence for 95 % intervals", ["Measure"] + run.names, rows,
                 f"Point estimates only: {run.evaluation.evidence}.")


CLASSIFIER_TITLES = {"accuracy": "Type accuracy vs ground truth", "auc": "Type AUC vs ground truth",
                     "class_flip_rate": "Type flips vs the reference classifier (share of lesions)",
                     "accuracy_drop": "Type accuracy drop"}


def classifier_tables(run: ComparisonRun) -> list:
    """The lesion-type classifiers' verdicts, when the comparison has classifiers."""
    from app.core.report import Table

    evaluation = run.classifier_evaluation
    if evaluation is None:
        return []
    rows = [[title] + [_verdict_text(v.verdicts.get(metric), metric) for v in evaluation.variants]
            for metric, title in CLASSIFIER_TITLES.items()]
    return [Table("Lesion-type classifiers, on the reference segmentation's lesions",
                  ["Measure"] + run.classifier_names, rows,
                  f"Point estimates; {evaluation.evidence}." if not evaluation.sufficient else
                  "Point estimate [paired-bootstrap 95 % interval over cases].")]


def _verdict_text(verdict, metric: str) -> str:
    if verdict is None:
        return "—"
    digits = 0 if metric.startswith("lesions_") else (2 if metric.startswith("hd95") else 3)
    if verdict.low is None or verdict.high is None:
        return _number(verdict.point, digits)   # the table's title says why there is no interval
    return verdict.text(digits)


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def per_case_table(run: ComparisonRun, labels: Sequence[str]):
    from app.core.report import Table

    rows = []
    for n, label in enumerate(labels):
        for result in run.evaluation.variants:
            r = result.rows[n]
            rows.append([label, result.name, _number(r.dice), _number(r.hd95_mm, 2), _number(r.fidelity_dice),
                         str(r.lesions_lost), str(r.lesions_gained), _number(r.total_s, 2)])
    columns = ["Case", "Variant", "Dice", "HD95 mm", "Fidelity Dice", "Lost", "Gained", "Seconds"]
    return Table("Per case", columns, rows, "Dice and HD95 against ground truth (n/a without labels); "
                 "fidelity, lost and gained lesions against the reference.")


def cost_table(run: ComparisonRun):
    from app.core.report import Table

    rows = [[name, variant.format, f"{size / 1e6:.3f}", _number(network, 3), _number(total, 2)]
            for name, variant, size, network, total in zip(run.names, run.variants, run.size_bytes(),
                                                           run.network_s(), run.latency_s())]
    return Table("Size and latency", ["Variant", "Format", "Deployed size (MB)", "Network s per case",
                                      "Total s per case"], rows,
                 "As each runner reported on this machine; the total runs from loading to post-processing "
                 "and includes loading the model on the first case.")


@dataclass
class ChartSeries:
    """One bar chart's numbers: a group of bars per category, a bar per variant."""

    title: str
    categories: list[str]
    values: dict[str, list[float]]  # variant -> one value per category
    unit: str
    errors: dict[str, tuple[list[float], list[float]]] | None = None  # variant -> (lows, highs)
    note: str = ""
    y_range: tuple[float, float] | None = None  # fixed axis (Dice: 0..1), else fitted


def chart_series(run: ComparisonRun, labels: Sequence[str]) -> list[ChartSeries]:
    """Per-case Dice (vs truth when labelled, else fidelity), whole-set Dice with its interval
    when there is evidence for one, deployed size and network latency — for the view and the report."""
    results = run.evaluation.variants
    has_truth = "dice" in run.evaluation.reference.verdicts
    metric = "dice" if has_truth else "fidelity_dice"
    name = "Dice vs ground truth" if has_truth else "Fidelity Dice vs the reference"
    charts = [ChartSeries(f"{name}, per case", list(labels),
                          {r.name: [getattr(row, metric) for row in r.rows] for r in results}, "Dice",
                          y_range=(0.0, 1.05))]
    errors = {r.name: ([r.verdicts[metric].low], [r.verdicts[metric].high]) for r in results
              if r.verdicts.get(metric) is not None and r.verdicts[metric].low is not None}
    charts.append(ChartSeries(f"{name}, whole set", ["whole set"], {r.name: [r.value(metric)] for r in results},
                              "Dice", errors or None, "95 % intervals" if errors else "no interval: insufficient evidence",
                              (0.0, 1.05)))
    sizes = run.size_bytes()
    scale, unit = (1e6, "MB") if max(sizes, default=0) >= 1e6 else (1e3, "kB")
    charts.append(ChartSeries("Deployed size", ["size"], {n: [b / scale] for n, b in zip(run.names, sizes)}, unit))
    charts.append(ChartSeries("Network seconds per case", ["latency"],
                              {n: [s] for n, s in zip(run.names, run.network_s())}, "s",
                              note="the network alone; model loading excluded"))
    return charts


def charts(run: ComparisonRun, labels: Sequence[str]):
    from app.core.report import Figure, bar_chart_png

    return [Figure(c.title, bar_chart_png(c.title, c.categories, c.values, c.unit, c.errors, c.y_range),
                   f"{c.title} ({c.note})" if c.note else c.title)
            for c in chart_series(run, labels)]


def disagreement_table(run: ComparisonRun, labels: Sequence[str]):
    from app.core.disagreement import KIND_TITLES
    from app.core.report import Table

    rows = []
    for n, (case_index, name, item) in enumerate(run.all_disagreements(), 1):
        rows.append([str(n), labels[case_index], name, KIND_TITLES[item.kind],
                     f"{item.mean_diameter_mm:.1f}", item.size_band, str(item.slice_number), item.detail()])
    return Table("Lesion by lesion, against the reference",
                 ["#", "Case", "Variant", "Kind", "Size mm", "Lung-RADS size", "Slice", "Detail"], rows,
                 "Lesions matched with the shared one-to-one overlap rule; size = Lung-RADS mean diameter.")


def disagreement_images(run: ComparisonRun, labels: Sequence[str], top: int):
    from app.core.disagreement import KIND_TITLES
    from app.core.report import Figure

    figures = []
    for n, (case_index, name, item) in enumerate(run.all_disagreements()[:top], 1):
        png = disagreement_slice_png(run, case_index, _segmenter_of(run, name), item.centre_index,
                                     item.mean_diameter_mm)
        caption = f"#{n} {labels[case_index]}, slice {item.slice_number}: " \
                  f"{KIND_TITLES[item.kind].lower()} by {name}, {item.mean_diameter_mm:.1f} mm"
        figures.append(Figure(f"Disagreement {n}", png, caption))
    return figures


def _segmenter_of(run: ComparisonRun, name: str) -> int:
    """The segmentation shown for a disagreement: the variant itself, or the reference for a
    classifier's type flip (the classifiers looked at the reference's lesions)."""
    return run.names.index(name) if name in run.names else run.reference_index


def disagreement_slice_png(run: ComparisonRun, case_index: int, variant_index: int, centre_kji,
                           size_mm: float | None = None) -> bytes:
    """The axial slice through a disagreement, shown radiologically (patient's right on the left)."""
    from app.core.display import DisplayedScan, array_to_canonical, view_pixel_size, view_slice
    from app.core.report import disagreement_png

    volume = run.cases[case_index].case.volume
    scan = DisplayedScan(volume)
    canonical = array_to_canonical(centre_kji, scan.axes, volume.shape)
    k = int(round(canonical[0]))
    reference = run.findings(case_index, run.reference_index).labels
    other = run.findings(case_index, variant_index).labels
    return disagreement_png(
        view_slice(scan.canonical, "axial", k), view_slice(scan.orient(reference), "axial", k),
        view_slice(scan.orient(other), "axial", k), pixel_spacing=view_pixel_size("axial", scan.spacing),
        centre=(canonical[1], canonical[2]), ring_mm=size_mm)


def classifier_section(run: ComparisonRun, index: int):
    return _section(run.classifiers[index], run.classifier_names[index],
                    "reference classifier" if index == 0 else "compared classifier")


def variant_section(run: ComparisonRun, index: int):
    return _section(run.variants[index], run.names[index],
                    "reference" if index == run.reference_index else "compared")


def _section(variant, name: str, role: str):
    import json

    from app.core.report import VariantSection

    card, lineage = variant.card, variant.card.lineage
    facts = [("Model", f"{card.name} {card.version}"), ("Task", card.task), ("Intended use", card.intended_use),
             ("Training data", card.training_data), ("Format", variant.format),
             ("Weights SHA-256", variant.weights_sha256 or "—"), ("Parent SHA-256", lineage.parent_sha256 or "—"),
             ("Recipe", json.dumps(lineage.recipe, sort_keys=True) if lineage.recipe else "— (not compressed)")]
    if card.description:
        facts.insert(2, ("Description", card.description))
    return VariantSection(name, role, facts)


def write_reports(run: ComparisonRun, html_path: str | Path, pdf_path: str | Path | None = None,
                  identify: bool = False) -> list[Path]:
    """The HTML report (and the PDF when asked), each export recorded in the audit log."""
    from app.core.audit import append_audit
    from app.core.report import write_html, write_pdf

    data = report_data(run, identify=identify)
    written = [write_html(data, html_path)] + ([write_pdf(data, pdf_path)] if pdf_path else [])
    for path in written:
        append_audit("export", kind="comparison report", path=str(Path(path).resolve()), identified=identify,
                     models=[v.weights_sha256 for v in run.variants + run.classifiers], cases=len(run.cases))
    return written


# ---------------------------------------------------------------- what the compare view shows


@dataclass
class ViewSummary:
    """The comparison as the compare view shows it: tables, bar charts and the disagreement
    list with, per row, the case and voxel (k, j, i) the views jump to."""

    tables: list  # app.core.report.Table: whole set, per case, size and latency
    charts: list[ChartSeries]
    disagreements: object  # app.core.report.Table, most serious first
    locations: list[tuple[int, tuple[float, float, float]]]
    # app.core.disagreement kind of each row, "-pale" added for a merged/split lesion or one the
    # ground truth sides with the other variant on (the reference's false positive): a paler row
    kinds: list[str]
    evidence: str


def view_summary(run: ComparisonRun, identify: bool = False) -> ViewSummary:
    labels = case_labels(run, identify)
    return ViewSummary(
        tables=[verdict_table(run), per_case_table(run, labels), cost_table(run)],
        charts=chart_series(run, labels), disagreements=disagreement_table(run, labels),
        locations=[(ci, d.centre_index) for ci, _name, d in run.all_disagreements()],
        kinds=[d.kind + ("-pale" if d.merged or d.reassuring else "")
               for _ci, _name, d in run.all_disagreements()],
        evidence=run.evaluation.evidence)

# ---------------------------------------------------------------- DICOM SEG


def export_segs(run: ComparisonRun, folder: Path, identify: bool = False,
                variant_indices: Sequence[int] | None = None) -> list[Path]:
    """Each variant's findings on each case as DICOM SEG referencing the case's series files, and
    its lesion table as a DICOM SR (TID 1500) on that SEG beside it."""
    from app.core.seg_export import export_lesion_sr, export_seg, series_files

    labels = case_labels(run, identify)
    written = []
    for ci, compared in enumerate(run.cases):
        source = Path(compared.case.series)
        if not source.exists():
            continue   # the manifest named the series by UID: no files to reference
        for vi in variant_indices if variant_indices is not None else range(len(run.variants)):
            variant = run.variants[vi]
            name = f"{labels[ci]}_{run.names[vi]}".replace(" ", "_").replace("#", "")
            findings = run.findings(ci, vi)
            result = export_seg(findings.labels, compared.case.volume, series_files(source),
                                variant.card, Path(folder) / f"{name}.seg.dcm", weights_sha256=variant.weights_sha256)
            report = export_lesion_sr(findings.lesions, result.path, variant.card, Path(folder) / f"{name}.sr.dcm",
                                      weights_sha256=variant.weights_sha256)
            written += [result.path, report]
    return written
