"""Export: ONNX and TorchScript verified against torch on identical inputs, written atomically."""
from __future__ import annotations

import numpy as np
import pytest

from compression.export import (
    ExportError,
    conv_weight_shapes,
    example_input,
    export_onnx,
    export_torchscript,
    sparse_storage_pays,
    write_sparse_onnx,
)
from compression.training import onnx_logits
from tests.compression.tiny import TINY_UNET


def tiny_net(seed: int = 0):
    import torch

    from app.core.model_card import Architecture
    from app.core.models import build_network

    torch.manual_seed(seed)
    return build_network(Architecture("UNet", TINY_UNET)).eval()


def test_onnx_export_is_verified_within_the_stated_tolerance(tmp_path):
    record = export_onnx(tiny_net(), tmp_path / "m.onnx", (1, 1, 32, 32))
    assert record["verified"] and record["max_abs_diff"] <= record["atol"]
    # dynamic spatial axes: the same file runs on another slice size
    assert onnx_logits(tmp_path / "m.onnx", example_input((2, 1, 48, 64))).shape == (2, 2, 48, 64)


def test_an_export_that_does_not_reproduce_torch_fails_and_leaves_no_file_behind(tmp_path):
    import torch

    class Drifting(torch.nn.Module):  # the traced graph freezes a Python-side choice torch does not
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(Drifting(), tmp_path / "bad.onnx", (1, 1, 8, 8))
    with pytest.raises(ExportError, match="TorchScript"):
        export_torchscript(Drifting(), tmp_path / "bad.ts", (1, 1, 8, 8))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary files left


def test_torchscript_export_is_verified_on_a_fresh_input(tmp_path):
    record = export_torchscript(tiny_net(), tmp_path / "m.ts", (1, 1, 32, 32))
    assert record["verified"] and record["max_abs_diff"] <= record["atol"]


def test_sparse_storage_pays_only_above_two_thirds_for_float32():
    assert not sparse_storage_pays(0.66) and sparse_storage_pays(0.67)
    assert not sparse_storage_pays(0.88, value_bytes=1) and sparse_storage_pays(0.9, value_bytes=1)


def test_sparse_initializers_load_in_stock_onnx_runtime_with_identical_outputs(tmp_path):
    import torch

    net = tiny_net()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p[p.abs() < p.abs().flatten().kthvalue(int(0.9 * p.numel())).values] = 0
    export_onnx(net, tmp_path / "dense.onnx", (1, 1, 32, 32))
    stats = write_sparse_onnx(tmp_path / "dense.onnx", tmp_path / "sparse.onnx")
    assert stats["sparse_tensors"] > 0 and stats["nonzeros"] < 0.2 * stats["total"]
    assert (tmp_path / "sparse.onnx").stat().st_size < 0.5 * (tmp_path / "dense.onnx").stat().st_size
    x = example_input((1, 1, 32, 32))
    assert np.array_equal(onnx_logits(tmp_path / "dense.onnx", x), onnx_logits(tmp_path / "sparse.onnx", x))
    assert conv_weight_shapes(tmp_path / "sparse.onnx") == conv_weight_shapes(tmp_path / "dense.onnx")
