"""Model cards: the published schema, loading, saving and the messages for bad cards."""
from __future__ import annotations

import json

import pytest

from app.core.model_card import (
    SCHEMA_PATH,
    ModelError,
    card_from_dict,
    card_to_dict,
    load_card,
    save_card,
)
from tests.core.model_fixtures import DEMO_MODELS, segmentation_card


def test_the_published_schema_is_valid_draft_2020_12():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", ["lung-nodule-unet2d", "nodule-type-densenet"])
def test_demo_model_cards_validate_against_the_published_schema(name):
    import jsonschema

    data = json.loads((DEMO_MODELS / name / "card.json").read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(data)
    card = load_card(DEMO_MODELS / name / "card.json")
    assert "synthetic phantoms" in card.intended_use
    assert len(card.lineage.weights_sha256) == 64
    assert card.lineage.training_time_s > 0


def test_a_card_survives_save_and_load(tmp_path):
    card = segmentation_card(dims=3, patch=(16, 32, 32)).with_lineage(seed=7, metrics={"dice": 0.9})
    save_card(card, tmp_path / "card.json")
    again = load_card(tmp_path / "card.json")
    assert again == card
    assert again.input.patch_size == (16, 32, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]  # no temporary left behind


def test_unknown_schema_version_names_the_file_and_the_version(tmp_path):
    data = card_to_dict(segmentation_card())
    data["schema_version"] = "7.0"
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"future\.json.*schema_version '7\.0'"):
        load_card(path)


def test_a_card_breaking_the_schema_names_the_field(tmp_path):
    data = card_to_dict(segmentation_card())
    data["task"] = "detection"
    with pytest.raises(ModelError, match=r"my\.json: model card field task"):
        card_from_dict(data, "my.json")
    data = card_to_dict(segmentation_card())
    data["labels"][1]["colour"] = "red"
    with pytest.raises(ModelError, match=r"labels/1/colour"):
        card_from_dict(data, "my.json")


def test_dims_and_axes_must_agree():
    data = card_to_dict(segmentation_card(dims=2))
    data["input"]["dims"] = 3
    with pytest.raises(ModelError, match="input"):
        card_from_dict(data)


def test_a_2p5d_card_keeps_its_neighbouring_slices_and_one_slice_cards_read_as_before():
    from dataclasses import replace

    one = card_to_dict(segmentation_card())
    assert "slice_context" not in one["input"]  # cards written before 2.5-D are unchanged
    card = segmentation_card(channels=3)
    card = replace(card, input=replace(card.input, slice_context=1))
    data = card_to_dict(card)
    assert data["input"]["slice_context"] == 1
    assert card_from_dict(data).input == card.input
    data["input"]["channels"] = 2  # 1 neighbour on each side is 3 slices
    with pytest.raises(ModelError, match="slice_context 1 needs a 2D input of 3 channels"):
        card_from_dict(data)


def test_a_card_that_is_not_json_is_a_message(tmp_path):
    path = tmp_path / "card.json"
    path.write_text("{ not json")
    with pytest.raises(ModelError, match=r"card\.json: model card is not valid JSON"):
        load_card(path)


def test_output_channels_follow_labels_and_activation():
    from dataclasses import replace

    card = segmentation_card(labels=3)
    assert card.output_channels == 3
    assert replace(card, output_activation="sigmoid").output_channels == 2


def test_the_lesion_clean_up_reads_as_words():
    from app.core.model_card import Postprocessing

    assert Postprocessing().describe() == "none"
    assert Postprocessing(min_lesion_mm3=80.0, min_lesion_score=0.5, max_elongation=1.8).describe() == (
        "drops lesions < 80 mm³ or peak probability < 0.5 or elongation > 1.8 (vessel- or plate-shaped)")


def test_the_clean_up_says_why_it_drops_each_lesion():
    import numpy as np

    from app.core.model_card import CandidateFilter, Postprocessing

    rule = Postprocessing(min_lesion_mm3=40.0, max_elongation=1.8, candidate_filter=CandidateFilter(threshold=0.5))
    volume, peak = np.array([120.0, 31.0, 90.0, 12.0]), np.array([0.9, 0.8, 0.7, 0.6])
    elongation, scores = np.array([1.2, 1.1, 2.4, 1.9]), np.array([0.9, 0.8, 0.12, 0.3])
    assert rule.reasons(volume, peak, elongation, scores) == [
        [],
        ["31 mm³ < 40 mm³"],
        ["elongation 2.40 > 1.8", "candidate-filter score 0.12 < 0.5"],
        ["12 mm³ < 40 mm³", "elongation 1.90 > 1.8", "candidate-filter score 0.30 < 0.5"]]
    assert rule.drops(volume, peak, elongation, scores).tolist() == [False, True, True, True]
    assert Postprocessing().reasons(volume, peak) == [[], [], [], []]
