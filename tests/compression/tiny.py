"""Tiny real data and models for the compression tests: 64×64 CT-like slices, UNets of a few kB.

Built once per test session (``functools.cache``) and shared by every test module, so the whole
compression suite trains its reference model only once.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from app.core.model_card import Architecture, InputSpec, Label, ModelCard, Preprocessing, save_card
from app.core.volume import Volume

from compression.data import CaseData

TINY_UNET = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
             "strides": [2, 2], "num_res_units": 1, "act": "RELU"}
SIZE = 64
# One thread: on two shared cores a second torch thread mostly waits (20 ms vs 0.4 s a step here).
THREADS = 1
FOREGROUND_WEIGHT = 10.0  # training from scratch on 3 % nodule pixels (see segmentation_loss)


def phantom_case(seed: int, slices: int = 8, size: int = SIZE, patient: str | None = None) -> CaseData:
    """Lung (−850 HU) in soft tissue, 1–3 round nodules (+30 HU) of 3–7 px radius, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    body = ((y - size / 2) / (size * 0.48)) ** 2 + ((x - size / 2) / (size * 0.48)) ** 2 < 1
    lung = ((y - size / 2) / (size * 0.40)) ** 2 + ((x - size / 2) / (size * 0.36)) ** 2 < 1
    voxels = np.full((slices, size, size), -1000.0, np.float32)
    voxels[:, body] = 40
    voxels[:, lung] = -850
    labels = np.zeros((slices, size, size), np.uint8)
    for k in range(slices):
        if rng.random() < 0.25:  # some slices without any nodule
            continue
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(3, 7)
            cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
            disc = (y - cy) ** 2 + (x - cx) ** 2 < r * r
            voxels[k][disc] = 30
            labels[k][disc] = 1
    voxels += rng.normal(0, 25, voxels.shape)
    volume = Volume(voxels=voxels.astype(np.int16), spacing=(2.0, 0.8, 0.8), series_uid=f"1.2.3.{seed}")
    return CaseData(f"case{seed}", patient or f"P{seed}", f"series{seed}", volume, labels)


def tiny_card(arch: dict | None = None, name: str = "tiny-unet") -> ModelCard:
    return ModelCard(
        name=name, version="0.1", task="segmentation",
        labels=(Label(0, "background", "#000000"), Label(1, "nodule", "#ff4040")),
        input=InputSpec(axes="NCHW", dims=2, channels=1, size_divisor=4),
        preprocessing=Preprocessing(hu_window=(-1000.0, 400.0), clip=True, normalisation="window_0_1"),
        output_activation="softmax", intended_use="tests only", training_data="tiny phantoms",
        architecture=Architecture("UNet", dict(arch or TINY_UNET)), files={"weights": "model.pt", "onnx": "model.onnx"},
    )


def write_variant_folder(folder: Path, net, card: ModelCard) -> Path:
    import torch

    from compression.export import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    export_onnx(net, folder / "model.onnx", (1, 1, SIZE, SIZE))
    save_card(card, folder / "card.json")
    return folder / "card.json"


@functools.cache
def train_cases() -> tuple[CaseData, ...]:
    return tuple(phantom_case(seed) for seed in range(4))


@functools.cache
def calib_cases() -> tuple[CaseData, ...]:
    return tuple(phantom_case(seed) for seed in range(10, 12))


@functools.cache
def eval_cases() -> tuple[CaseData, ...]:
    return tuple(phantom_case(seed) for seed in range(20, 23))


def train_tiny(arch: dict, steps: int, seed: int = 0, cases=None, lr: float = 1e-2):
    """A UNet trained with labels on the phantoms (deterministic for a seed)."""
    from app.core.models import build_network
    from app.core.progress import run_to_end

    from compression.data import slice_tensors
    from compression.training import TrainConfig, make_labels_loss, seed_all, train_loop

    seed_all(seed, threads=1)
    net = build_network(Architecture("UNet", arch))
    x, y = slice_tensors(list(cases or train_cases()), tiny_card(arch), with_labels=True)
    run_to_end(train_loop(net, {"x": x, "y": y.astype(np.int64)}, make_labels_loss(FOREGROUND_WEIGHT),
                          TrainConfig(steps=steps, batch_size=8, lr=lr, seed=seed, threads=1)))
    return net.eval()


@functools.cache
def trained_variant_card() -> Path:
    """The reference model every step compresses: trained 100 steps, written as a real variant folder."""
    root = Path(tempfile.mkdtemp(prefix="medcompress-tiny-"))
    atexit.register(shutil.rmtree, root, True)  # shared by every module of the session, removed at its end
    folder = root / "tiny-unet"
    return write_variant_folder(folder, train_tiny(TINY_UNET, steps=100), tiny_card())


def eval_dice(module, cases=None) -> float:
    """Dice vs ground truth on the eval phantoms, over all slices."""
    from compression.data import slice_tensors
    from compression.training import mask_dice, masks_from_logits, predict_logits

    x, y = slice_tensors(list(cases or eval_cases()), tiny_card(), with_labels=True)
    return mask_dice(masks_from_logits(predict_logits(module, x)), y > 0)
