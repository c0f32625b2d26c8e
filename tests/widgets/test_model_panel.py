"""The Models dock shows the card (intended use first) and sends Run with the chosen threads."""
from __future__ import annotations

from app.core.findings import Findings, Timing
from app.core.models import open_model
from app.session import AI_NOTICE, OpenModel
from tests.core.model_fixtures import chest_phantom, small_unet
from widgets.model_panel import ModelPanel, input_text


def test_card_intended_use_size_and_run(qtbot, tmp_path):
    variant = open_model(small_unet(tmp_path / "unet"))
    panel = ModelPanel()
    qtbot.addWidget(panel)
    assert not panel.run_button.isEnabled()
    model = OpenModel(variant)
    panel.add_model(model)
    text = panel.card_view.toPlainText()
    assert "Intended use:" in text and variant.card.intended_use in text
    assert variant.main_file.name in text and "MB runs" in text
    assert "Lesion clean-up" in text and variant.card.postprocessing.describe() in text
    assert input_text(variant.card.input) in text and "None" not in input_text(variant.card.input)
    panel.threads.setValue(3)
    with qtbot.waitSignal(panel.run_requested, timeout=2_000) as blocker:
        panel.run_button.click()
    assert blocker.args == [model, 3]

    volume = chest_phantom()
    findings = Findings.for_volume(volume, {"provider": "CPUExecutionProvider"},
                                   timing=Timing(0.1, 0.2, 1.5, 0.3))
    panel.show_findings(model, findings)
    shown = panel.findings_view.text()
    assert AI_NOTICE in shown and "network 1.50 s" in shown and "total 2.10 s" in shown


def test_input_is_described_in_words_for_slices_and_patches():
    from app.core.model_card import InputSpec, RoiSpec

    assert input_text(InputSpec("NCHW", 2, 1)) == "2D whole slices, native spacing, 1 channel (axes NCHW)"
    assert input_text(InputSpec("NCHW", 2, 3, slice_context=1)) == (
        "2D whole slices, native spacing, 3 channels: each slice with 1 neighbour on either side (axes NCHW)")
    patches = InputSpec("NCDHW", 3, 2, patch_size=(96, 96, 96), target_spacing=(1.5, 1.0, 1.0), overlap=0.5)
    assert input_text(patches) == "3D 96×96×96 patches (50% overlap), resampled to 1.5×1×1 mm, 2 channels (axes NCDHW)"
    around = input_text(InputSpec("NCHW", 2, 1, patch_size=(64, 64)), RoiSpec("lesion_centres", (64, 64)))
    assert around == "2D 64×64 patches around each lesion centre, native spacing, 1 channel (axes NCHW)"


def test_a_segmentation_with_a_candidate_filter_shows_it_in_its_size_and_clean_up(qtbot):
    from tests.core.model_fixtures import DEMO_MODELS

    variant = open_model(DEMO_MODELS / "lung-nodule-unet2d" / "card.json")
    assert variant.card.postprocessing.candidate_filter is not None
    panel = ModelPanel()
    qtbot.addWidget(panel)
    panel.add_model(OpenModel(variant))
    text = panel.card_view.toPlainText()
    both = (variant.main_file.stat().st_size + variant.files["candidate_filter"].stat().st_size) / 1e6
    assert f"{both:.1f} MB runs (model.onnx + candidate_filter.onnx)" in text
    assert f"candidate-filter score < {variant.card.postprocessing.candidate_filter.threshold:g}" in text
