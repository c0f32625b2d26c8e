"""The session end to end on real files: index → progressive load → SEG overlay → a model run
in the compute process → findings as overlays and lesions."""
from __future__ import annotations

import numpy as np
import pytest

from app.session import GROUND_TRUTH, Session


@pytest.fixture
def session(qtbot, job_manager):
    s = Session(job_manager)
    yield s
    job_manager.shutdown()
    s.close()


def test_opening_a_folder_shows_the_first_series_and_its_ground_truth(qtbot, session, demo_tiny):
    slices, overlays, lesions = [], [], []
    session.slices_loaded.connect(lambda lo, hi: slices.append((lo, hi)))
    session.overlay_ready.connect(lambda name, labels, is_ai: overlays.append((name, labels, is_ai)))
    session.lesions_ready.connect(lambda source, table, is_ai: lesions.append((source, table)))
    with qtbot.waitSignal(session.volume_opened, timeout=60_000) as opened:
        session.open_path(str(demo_tiny / "CASE001"))
    volume, first = opened.args
    assert volume.loaded[first], "the first-shown slice is there before the rest"
    qtbot.waitUntil(lambda: bool(overlays), timeout=60_000)
    assert session.volume.is_complete and slices
    covered = np.zeros(volume.shape[0], bool)
    for lo, hi in slices:
        covered[lo:hi] = True
    assert covered.all(), "every slice range was announced to the viewer"
    name, labels, is_ai = overlays[0]
    assert name == GROUND_TRUTH and not is_ai and labels.shape == volume.shape
    truth = session.index.image_series()[0]
    assert truth.series_uid == session.series.series_uid
    from app.core.lesions import label_instances
    assert labels.any(), "the SEG marks nodules in this case"
    assert len(lesions[0][1]) == label_instances(labels)[1], "one lesion row per connected nodule"


def test_a_folder_of_studies_can_open_on_a_chosen_patient(qtbot, session, demo_tiny):
    with qtbot.waitSignal(session.volume_opened, timeout=60_000):
        session.open_path(str(demo_tiny), prefer_patient="DEMO-0-002")
    images = session.index.image_series()
    assert len(images) == 3 and images[0].patient_id != "DEMO-0-002"  # not simply the first
    assert session.series.patient_id == "DEMO-0-002"


def test_a_model_runs_in_the_compute_process_and_its_findings_arrive(qtbot, session, demo_tiny, tmp_path):
    from tests.core.model_fixtures import small_unet

    card = small_unet(tmp_path / "tiny-unet")
    with qtbot.waitSignal(session.volume_completed, timeout=60_000):
        session.open_path(str(demo_tiny / "CASE002"))
    with qtbot.waitSignal(session.model_opened, timeout=60_000) as opened:
        session.open_model(str(card))
    model = opened.args[0]
    overlays = []
    session.overlay_ready.connect(lambda name, labels, is_ai: overlays.append((name, is_ai)))
    with qtbot.waitSignal(session.findings_ready, timeout=120_000) as done:
        session.run_model(model, threads=1)
    findings = done.args[1]
    assert findings.labels.shape == session.volume.shape and findings.labels.dtype == np.uint8
    assert findings.timing.network_s > 0 and findings.provider
    assert (model.name, True) in overlays
    assert model.findings[session.series.key] is findings
