"""Shared helpers of the step tests: a fresh working copy of the tiny trained model, step data."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from app.core.models import open_model

from compression.pipeline import StepData, WorkingModel, working_copy
from tests.compression.tiny import THREADS, calib_cases, train_cases, trained_variant_card


def parent():
    return open_model(trained_variant_card())


def fresh_model() -> WorkingModel:
    """A private working copy of the trained tiny model, as run_steps makes it."""
    work = Path(tempfile.mkdtemp(prefix="medcompress-work-"))
    atexit.register(shutil.rmtree, work, True)
    return working_copy(parent(), work)


def step_data(**changes) -> StepData:
    base = dict(train=list(train_cases()), calib=list(calib_cases()), threads=THREADS)
    return StepData(**{**base, **changes})
