"""Weight clustering / sharing (Deep Compression): each layer's weights take one of k shared values.

Stored as an archive (.npz) of per-layer codebooks plus small integer indices (4 bits each for
k ≤ 16), which is what a hospital downloads. A stock runtime cannot read that archive: it loads
the decoded float32 weights, so the deployed size does not change, and the notes say so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.core.progress import Progress, scaled

from compression.pipeline import StepData, WorkingModel
from compression.steps._common import recover, weight_layers


def kmeans_1d(values: np.ndarray, clusters: int, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Codebook (k,) and indices of 1-D k-means with linear initialisation (best for weights, Han et al.)."""
    values = values.astype(np.float64).ravel()
    k = max(1, min(clusters, len(np.unique(values))))
    codebook = np.linspace(values.min(), values.max(), k)
    for _ in range(iterations):
        index = _nearest(values, codebook)
        sums = np.bincount(index, weights=values, minlength=k)
        counts = np.bincount(index, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), codebook)
        if np.allclose(moved, codebook):
            break
        codebook = moved
    return codebook.astype(np.float32), _nearest(values, codebook).astype(np.uint8)


def _nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    order = np.argsort(codebook)
    edges = (codebook[order][1:] + codebook[order][:-1]) / 2
    return order[np.searchsorted(edges, values)]


def cluster_weights(model: WorkingModel, data: StepData, *, clusters: int = 16, min_params: int = 256,
                    finetune_steps: int = 0, lr: float = 2e-4, batch_size: int = 8, crop: int | None = None,
                    amp: str = "auto", use: str = "auto", max_slices: int | None = 64):
    """Cluster every conv/linear weight tensor into ``clusters`` shared values (≤ 256).

    With ``finetune_steps``, the model is fine-tuned and each cluster's shared value is moved to
    the mean of its members' tuned weights (the assignments stay), as Deep Compression's
    centroid fine-tuning does.
    """
    if not 2 <= clusters <= 256:
        raise ValueError(f"clusters must be between 2 and 256, not {clusters}")
    module = model.require_module("cluster_weights")
    layers, too_small = weight_layers(module, min_params)
    model.skipped += too_small
    assignments = {}
    for number, (name, layer) in enumerate(layers, 1):
        codebook, index = kmeans_1d(layer.weight.detach().numpy(), clusters)
        assignments[name] = index
        _set_weight(layer, codebook[index].reshape(layer.weight.shape))
        yield Progress(0.3 * number / max(1, len(layers)), f"clustered {name}")
    if finetune_steps:
        stats = yield from scaled(recover(model, data, steps=finetune_steps, lr=lr, batch_size=batch_size, crop=crop,
                                          amp=amp, use=use, max_slices=max_slices), 0.3, 0.9)
        model.metrics.setdefault("finetune", []).append(stats)
        for name, layer in layers:
            _recentre(layer, assignments[name], clusters)
    archive = model.scratch("weights.clustered.npz")
    write_archive(archive, module, {n: l for n, l in layers}, assignments, clusters)
    model.extra_files["archive"] = archive
    _report(model, layers, clusters, archive)
    yield Progress(1.0, "clustering done")
    return model


def _set_weight(layer, array: np.ndarray) -> None:
    import torch

    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(array, np.float32)))


def _recentre(layer, index: np.ndarray, clusters: int) -> None:
    """Shared value of each cluster := mean of its members after fine-tuning."""
    flat = layer.weight.detach().numpy().ravel().astype(np.float64)
    sums = np.bincount(index, weights=flat, minlength=clusters)
    counts = np.maximum(np.bincount(index, minlength=clusters), 1)
    _set_weight(layer, (sums / counts).astype(np.float32)[index].reshape(layer.weight.shape))


def _pack(index: np.ndarray, clusters: int) -> tuple[np.ndarray, int]:
    """Two 4-bit indices per byte when k ≤ 16, else one byte each."""
    if clusters > 16:
        return index.astype(np.uint8), 8
    return pack_nibbles(index), 4


def pack_nibbles(index: np.ndarray) -> np.ndarray:
    """Indices < 16 two per byte, the first in the low nibble (an odd count is padded with a 0)."""
    index = np.asarray(index, np.uint8).ravel()
    padded = np.concatenate([index, np.zeros(len(index) % 2, np.uint8)])
    return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[:count]
    out = np.empty(len(packed) * 2, np.uint8)
    out[0::2], out[1::2] = packed & 0x0F, packed >> 4
    return out[:count]


def write_archive(path: Path, module, clustered: dict, assignments: dict, clusters: int) -> None:
    """Codebooks + packed indices for clustered layers, float32 for every other tensor (compressed npz)."""
    arrays = {}
    for key, tensor in module.state_dict().items():
        layer_name = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer_name in clustered:
            flat = tensor.detach().numpy().ravel()
            index = assignments[layer_name]
            codebook = np.zeros(clusters, np.float32)
            codebook[np.unique(index)] = [flat[index == c][0] for c in np.unique(index)]
            packed, bits = _pack(index, clusters)
            arrays[f"{key}::codebook"], arrays[f"{key}::index{bits}"] = codebook, packed
            arrays[f"{key}::shape"] = np.asarray(tensor.shape, np.int64)
        else:
            arrays[key] = tensor.detach().numpy()
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def read_archive(path: Path) -> dict[str, np.ndarray]:
    """The archive decoded back to a plain state_dict of float arrays (what a loader would do)."""
    state = {}
    with np.load(path) as archive:
        names = list(archive.files)
        for name in names:
            if "::" not in name:
                state[name] = archive[name]
            elif name.endswith("::codebook"):
                key = name[: -len("::codebook")]
                shape = tuple(archive[f"{key}::shape"])
                bits = 4 if f"{key}::index4" in names else 8
                index = unpack(archive[f"{key}::index{bits}"], bits, int(np.prod(shape)))
                state[key] = archive[name][index].reshape(shape)
    return state


def _report(model: WorkingModel, layers, clusters: int, archive: Path) -> None:
    dense = sum(t.numel() * 4 for t in model.module.state_dict().values() if t.is_floating_point())
    size = archive.stat().st_size
    model.metrics["clustering"] = {"clusters": clusters, "layers": len(layers), "archive_bytes": size,
                                   "dense_float32_bytes": dense, "archive_ratio": dense / max(1, size)}
    model.notes.append(
        f"Weights of {len(layers)} layers share {clusters} values each; archive (codebooks + "
        f"{'4' if clusters <= 16 else '8'}-bit indices) {size} bytes vs {dense} bytes of float32 weights "
        f"(×{dense / max(1, size):.1f}). That is the download; a stock runtime loads the decoded float32 "
        "weights, so the deployed size and latency are unchanged.")
