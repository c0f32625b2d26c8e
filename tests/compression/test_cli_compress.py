"""``compress`` and ``evaluate`` commands on the tiny demo data, and the audit log they append to."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from app.core import audit
from app.core.manifest import read_manifest, write_manifest
from app.core.models import open_model, sha256_file
from app.core.progress import Progress
from compression import cli
from tests.core.model_fixtures import small_unet

PRUNE_RECIPE = """\
schema_version: "1.0"
name: sparse50
steps:
  - step: prune_unstructured
    sparsity: 0.5
budget:
  max_dice_drop: 1.0
  min_fidelity_dice: 1.0
"""


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py")
    cli.add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    args = _parse(argv)
    code = args.handler(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _events(kind: str) -> list[dict]:
    return [e for e in audit.read_audit() if e["event"] == kind]


@pytest.fixture
def tiny_model(tmp_path):
    return small_unet(tmp_path / "model")


def test_compress_writes_the_variant_judges_it_and_audits_the_run(tmp_path, demo_tiny, tiny_model, capsys):
    recipe = tmp_path / "sparse.yaml"
    recipe.write_text(PRUNE_RECIPE, encoding="utf-8")
    model_hashes = {p.name: sha256_file(p) for p in tiny_model.parent.iterdir()}
    code, out, err = _run(["compress", "--model", str(tiny_model), "--data", str(demo_tiny), "--recipe", str(recipe),
                           "--out", str(tmp_path / "out"), "--threads", "1", "--seed", "0", "--resamples", "100"],
                          capsys)
    folder = tmp_path / "out" / "test-unet2d-sparse50"
    assert code == cli.EXIT_OVER_BUDGET, err  # min_fidelity_dice 1.0: any change at all breaks it
    assert "over the budget: fidelity Dice" in out and "insufficient evidence" in out
    assert "original" in out and "deployed" in out
    variant = open_model(folder / "card.json")
    assert variant.card.lineage.recipe["name"] == "sparse50"
    assert {p.name: sha256_file(p) for p in tiny_model.parent.iterdir()} == model_hashes  # input untouched
    event = next(e for e in _events("compress") if e["variant"] == str(folder))
    assert event["weights_sha256"] == variant.weights_sha256
    assert event["verdict"] == "over budget" and event["recipe"]["steps"][0]["sparsity"] == 0.5
    record = json.loads((tmp_path / "out" / "test-unet2d-sparse50.evaluation.json").read_text())
    assert record["cases"] == len(read_manifest(demo_tiny / "manifest.csv").cases_in("eval"))


def test_compress_judges_a_variant_compressed_further_against_the_reference(tmp_path, demo_tiny, tiny_model, capsys):
    recipe = tmp_path / "sparse.yaml"
    recipe.write_text(PRUNE_RECIPE, encoding="utf-8")
    common = ["--data", str(demo_tiny), "--recipe", str(recipe), "--threads", "1", "--resamples", "100"]
    _run(["compress", "--model", str(tiny_model), "--out", str(tmp_path / "a")] + common, capsys)
    sparse = tmp_path / "a" / "test-unet2d-sparse50" / "card.json"
    fidelity = {}
    for name, extra in (("alone", []), ("reference", ["--reference", str(tiny_model)])):
        code, _, err = _run(["compress", "--model", str(sparse), "--out", str(tmp_path / name)] + common + extra,
                            capsys)
        assert code in (cli.EXIT_OK, cli.EXIT_OVER_BUDGET), err
        folder = next(p for p in (tmp_path / name).iterdir() if p.is_dir())
        record = json.loads((tmp_path / name / f"{folder.name}.evaluation.json").read_text())
        fidelity[name] = record["variants"][folder.name]["fidelity_dice"]["point"]
        event = next(e for e in _events("compress") if e["variant"] == str(folder))
        assert event["reference"] == (str(tiny_model) if extra else None)
    # 50 % sparsity is the whole model's target, which the variant already meets: against itself
    # nothing changed; against the original, half its weights are gone
    assert fidelity["alone"] == 1.0 and fidelity["reference"] < 1.0
    code, _, err = _run(["compress", "--model", str(sparse), "--out", str(tmp_path / "s"), "--search", "size",
                         "--reference", str(tiny_model)] + common, capsys)
    assert code == cli.EXIT_BAD_INPUT and "--reference" in err and "search" in err


def test_compress_refuses_an_unfair_split_before_compressing_anything(tmp_path, demo_tiny, tiny_model, capsys):
    manifest = read_manifest(demo_tiny / "manifest.csv")
    eval_case = manifest.cases_in("eval")[0]
    train_case = manifest.cases_in("train")[0]
    from dataclasses import replace

    leaky = [replace(c, patient=eval_case.patient) if c == train_case else c for c in manifest.cases]
    # Relative paths start at the CSV's folder: write it into a copy of the (shared, read-only) data.
    data = tmp_path / "data"
    shutil.copytree(demo_tiny, data)
    write_manifest(replace(manifest, cases=leaky, root=data), data / "manifest.csv")
    before = len(audit.read_audit())
    code, out, err = _run(["compress", "--model", str(tiny_model), "--data", str(data / "manifest.csv"),
                           "--recipe", "safe-int8", "--out", str(tmp_path / "out")], capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert f"patient {eval_case.patient}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert len(audit.read_audit()) == before


def test_a_recipe_with_a_bad_budget_is_one_line_naming_the_field(tmp_path, demo_tiny, tiny_model, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(PRUNE_RECIPE.replace("max_dice_drop: 1.0", "max_dice_drop: a lot"), encoding="utf-8")
    code, _, err = _run(["compress", "--model", str(tiny_model), "--data", str(demo_tiny), "--recipe", str(recipe),
                         "--out", str(tmp_path / "out")], capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert "budget.max_dice_drop" in err and err.count("\n") == 1


def test_evaluate_prints_the_comparison_with_intervals_and_audits_it(tmp_path, demo_tiny, tiny_model, capsys):
    torch_card = tmp_path / "torch" / "card.json"
    shutil.copytree(tiny_model.parent, torch_card.parent)
    card = json.loads(torch_card.read_text())
    card["name"], card["files"] = "tiny-torch", {"weights": "model.pt"}
    torch_card.write_text(json.dumps(card))
    code, out, err = _run(["evaluate", "--models", str(tiny_model), str(torch_card), "--data", str(demo_tiny),
                           "--threads", "1", "--json", str(tmp_path / "cmp.json"), "--resamples", "100"], capsys)
    assert code == cli.EXIT_OK, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["variant", "dice", "dice_drop"]
    assert lines[2].startswith("test-unet2d 0.1 (original)") and lines[3].startswith("tiny-torch 0.1")
    assert "insufficient evidence" in out and "paired bootstrap 95 % intervals" in out
    record = json.loads((tmp_path / "cmp.json").read_text())
    assert record["variants"]["tiny-torch 0.1"]["fidelity_dice"]["point"] > 0.99  # ORT vs torch, same weights
    event = _events("evaluate")[-1]
    assert event["models"] == [str(tiny_model), str(torch_card)] and len(event["sha256"]) == 2


def test_a_folder_without_a_manifest_is_split_by_patient(tmp_path, demo_tiny):
    data = tmp_path / "scans"
    shutil.copytree(demo_tiny, data)
    (data / "manifest.csv").unlink()
    manifest = cli.data_manifest(data, seed=0, bar=cli.ProgressBar(io.StringIO()))
    assert sorted(c.case for c in manifest.cases) == ["CASE001", "CASE002", "CASE003"]
    assert {c.split for c in manifest.cases} == {"train", "calib", "eval"}
    assert all(c.labels.endswith("nodules.nii.gz") for c in manifest.cases)
    again = cli.data_manifest(data, seed=0, bar=cli.ProgressBar(io.StringIO()))
    assert [c.split for c in again.cases] == [c.split for c in manifest.cases]


def test_the_progress_bar_writes_a_line_per_message_when_piped():
    stream = io.StringIO()
    bar = cli.ProgressBar(stream, width=10)
    for p in (Progress(0.0, "loading"), Progress(0.5, "loading"), Progress(0.5, "pruning"), Progress(None, "x")):
        bar(p)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[----------]   0% loading" and lines[1] == "[#####-----]  50% pruning"
    assert len(lines) == 3 and lines[2].endswith(" x")


def test_the_audit_log_appends_whole_lines_under_the_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCOMPRESS_HOME", str(tmp_path / "home"))
    audit.append_audit("export", path=Path("/x/model.onnx"), sizes=(1, 2))
    audit.append_audit("accept", variant="v1")
    log = tmp_path / "home" / "audit.jsonl"
    lines = log.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["export", "accept"]
    assert json.loads(lines[0])["path"] == "/x/model.onnx" and json.loads(lines[0])["sizes"] == [1, 2]
    with open(log, "a", encoding="utf-8") as handle:
        handle.write('{"event": "torn')  # a power cut mid-line
    assert [e["event"] for e in audit.read_audit()] == ["export", "accept"]


def test_the_audit_log_lives_where_app_paths_puts_the_data(monkeypatch, tmp_path):
    from app.paths import data_root

    monkeypatch.delenv("MEDCOMPRESS_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert audit.audit_log_path().parent == data_root()
    monkeypatch.setenv("MEDCOMPRESS_HOME", str(tmp_path / "explicit"))
    assert audit.audit_log_path().parent == data_root()
    assert os.path.basename(audit.audit_log_path()) == "audit.jsonl"


def test_compress_search_keeps_every_trial_and_prints_the_front(tmp_path, demo_tiny, tiny_model, capsys):
    recipe = tmp_path / "sparse.yaml"
    recipe.write_text(PRUNE_RECIPE.replace("  min_fidelity_dice: 1.0\n", ""), encoding="utf-8")
    code, out, err = _run(["compress", "--model", str(tiny_model), "--data", str(demo_tiny), "--recipe", str(recipe),
                           "--out", str(tmp_path / "out"), "--threads", "1", "--resamples", "50",
                           "--search", "size", "--candidates", "1"], capsys)
    assert code == cli.EXIT_OK, err
    assert (tmp_path / "out" / "test-unet2d-search" / "sparse50" / "card.json").is_file()
    assert "sparse50" in out and "Pareto front (size and Dice drop, within the budget): sparse50" in out
    event = _events("search")[-1]
    assert event["front"] == ["sparse50"] and event["trials"][0]["weights_sha256"]
