"""Real model variants for the compare tests that behave predictably on the demo phantoms.

A "density threshold" model is an ONNX graph of one 1×1 convolution: nodule logit = gain ·
(windowed HU − threshold), background logit = 0. It runs through the real ONNX runner, card and
cache like any model, and a higher threshold makes a degraded variant that loses the faint
(ground-glass) nodules first — so a test knows which lesions it must report missing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from app.core.model_card import InputSpec, Label, Lineage, ModelCard, Preprocessing, save_card

HU_WINDOW = (-1000.0, 400.0)
GAIN = 40.0


def hu_to_window(hu: float) -> float:
    return (hu - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0])


def threshold_onnx(path: Path, threshold_hu: float) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.array([[[[0.0]]], [[[GAIN]]]], np.float32)       # (out=2, in=1, 1, 1)
    bias = np.array([0.0, -GAIN * hu_to_window(threshold_hu)], np.float32)
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"])
    graph = helper.make_graph(
        [node], "density_threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, "h", "w"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def threshold_model(folder: Path, threshold_hu: float, name: str = "density-threshold",
                    version: str = "1.0", recipe: dict | None = None) -> Path:
    """A model folder (model.onnx + card.json); returns the card's path."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    threshold_onnx(folder / "model.onnx", threshold_hu)
    card = ModelCard(
        name=name, version=version, task="segmentation",
        labels=(Label(0, "background", "#000000"), Label(1, "nodule", "#ff4040")),
        input=InputSpec(axes="NCHW", dims=2, channels=1),
        preprocessing=Preprocessing(hu_window=HU_WINDOW, clip=True, normalisation="window_0_1"),
        output_activation="softmax", intended_use="tests only: thresholds density, finds no disease",
        training_data="none (hand-set weights)", files={"onnx": "model.onnx"},
        lineage=Lineage(recipe=recipe))
    save_card(card, folder / "card.json")
    return folder / "card.json"


def original_and_degraded(root: Path) -> tuple[Path, Path]:
    """Reference marks everything denser than −700 HU; the degraded variant only above −200 HU."""
    return (threshold_model(root / "original", -700.0, "density-threshold", "1.0"),
            threshold_model(root / "degraded", -200.0, "density-threshold", "1.0-degraded",
                            recipe={"steps": [{"step": "raise threshold", "to_hu": -200}]}))
