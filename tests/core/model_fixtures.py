"""Small real models and scans for the model/inference tests.

Real MONAI networks (tiny widths so they run in milliseconds), saved as state_dicts and
exported to ONNX in the test, with cards written through the real card code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.core.model_card import (
    Architecture,
    InputSpec,
    Label,
    ModelCard,
    Preprocessing,
    RoiSpec,
    save_card,
)
from app.core.volume import Volume

REPO = Path(__file__).resolve().parents[2]
DEMO_MODELS = REPO / "resources" / "models"

SMALL_UNET_2D = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                 "strides": [2, 2], "num_res_units": 1, "act": "RELU"}
SMALL_UNET_3D = {**SMALL_UNET_2D, "spatial_dims": 3}
SMALL_DENSENET = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_features": 8,
                  "growth_rate": 4, "block_config": [2, 2], "dropout_prob": 0.0}


def build(name: str, args: dict, seed: int = 0):
    import torch
    import monai.networks.nets as nets

    torch.manual_seed(seed)
    return getattr(nets, name)(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}).eval()


def export(net, path: Path, shape: tuple[int, ...], dynamic: bool = True) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():  # the exporter's deprecation and tracer chatter
        warnings.simplefilter("ignore")
        _export(net, path, shape, dynamic)


def _export(net, path: Path, shape: tuple[int, ...], dynamic: bool) -> None:
    import torch

    axes = {0: "n", **({i: f"d{i}" for i in range(2, len(shape))} if dynamic else {})}
    torch.onnx.export(net, torch.zeros(shape), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": axes, "logits": axes if len(shape) > 2 and dynamic else {0: "n"}},
                      opset_version=17, dynamo=False)


def segmentation_card(dims: int = 2, patch=None, channels: int = 1, labels: int = 2, arch=None,
                      divisor: int = 4) -> ModelCard:
    names = ["background", "nodule", "vessel", "other"][:labels]
    return ModelCard(
        name=f"test-unet{dims}d", version="0.1", task="segmentation",
        labels=tuple(Label(i, n, "#ff0000" if i else "#000000") for i, n in enumerate(names)),
        input=InputSpec(axes="NCHW" if dims == 2 else "NCDHW", dims=dims, channels=channels,
                        patch_size=patch, size_divisor=divisor),
        preprocessing=Preprocessing(hu_window=(-1000.0, 400.0), clip=True, normalisation="window_0_1"),
        output_activation="softmax", intended_use="tests only", training_data="none (random weights)",
        architecture=Architecture("UNet", arch or (SMALL_UNET_2D if dims == 2 else SMALL_UNET_3D)),
        files={"weights": "model.pt", "onnx": "model.onnx"},
    )


def write_model(folder: Path, card: ModelCard, net, onnx_shape, dynamic: bool = True) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    export(net, folder / "model.onnx", onnx_shape, dynamic)
    save_card(card, folder / "card.json")
    return folder / "card.json"


def small_unet(folder: Path, dims: int = 2, patch=None, **card_changes) -> Path:
    arch = SMALL_UNET_2D if dims == 2 else SMALL_UNET_3D
    net = build("UNet", arch)
    shape = (1, 1) + ((16, 16) if dims == 2 else tuple(patch or (16, 16, 16)))
    return write_model(folder, segmentation_card(dims, patch, **card_changes), net, shape)


def small_classifier(folder: Path, slices: int = 1) -> Path:
    """A lesion-type classifier on 16×16 patches; ``slices`` > 1 reads that many neighbouring
    axial slices as its channels."""
    roi = (16, 16) if slices == 1 else (slices, 16, 16)
    arch = {**SMALL_DENSENET, "in_channels": slices}
    card = ModelCard(
        name="test-type", version="0.1", task="classification",
        labels=tuple(Label(i, n, "#00ff00") for i, n in enumerate(("solid", "part-solid", "ground-glass"))),
        input=InputSpec(axes="NCHW", dims=2, channels=slices, patch_size=(16, 16)),
        preprocessing=Preprocessing(hu_window=(-1000.0, 400.0), clip=True, normalisation="window_0_1"),
        roi=RoiSpec(source="lesion_centres", patch_size_voxels=roi),
        output_activation="softmax", intended_use="tests only", training_data="none",
        architecture=Architecture("DenseNet", arch), files={"weights": "model.pt", "onnx": "model.onnx"},
    )
    return write_model(folder, card, build("DenseNet", arch), (1, slices, 16, 16), dynamic=False)


def chest_phantom(shape=(6, 48, 40), spacing=(2.5, 0.8, 0.8), seed: int = 0, nodules=((3, 20, 18, 4),)) -> Volume:
    """Air outside, lung inside an ellipse, soft-tissue spheres as nodules: int16 HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cy, cx = shape[1] / 2, shape[2] / 2
    body = ((y - cy) / (shape[1] * 0.45)) ** 2 + ((x - cx) / (shape[2] * 0.45)) ** 2 < 1
    voxels = np.where(body, 40, -1000).astype(np.float32)
    lung = ((y - cy) / (shape[1] * 0.35)) ** 2 + ((x - cx) / (shape[2] * 0.35)) ** 2 < 1
    voxels[lung] = -850
    for k, j, i, r in nodules:
        voxels[((z - k) * spacing[0]) ** 2 + ((y - j) * spacing[1]) ** 2 + ((x - i) * spacing[2]) ** 2 < (r * spacing[1]) ** 2] = 30
    voxels += rng.normal(0, 15, shape)
    return Volume(voxels=voxels.astype(np.int16), spacing=spacing, origin=(-16.0, -20.0, -100.0),
                  series_uid="1.2.826.0.1.3680043.8.498.1")
