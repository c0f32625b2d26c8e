"""Does ONNX Runtime run a UNet's up-sampling faster as a sub-pixel Conv than as a ConvTranspose?

    .venv/bin/python bench/bench_subpixel_upsampling.py [--rounds 40] [--threads 1 2]

ORT's CPU provider runs ConvTranspose outside its blocked (NCHWc) convolution kernels, with
reorders around it: on the 0.35-width student's shape it takes about a fifth of the network's
time. A ConvTranspose with kernel 3, stride 2, padding 1 and output padding 1 (MONAI's UNet
up-sampling) is exactly one 2×2 Conv with four times the output channels followed by
DepthToSpace: each of the four output phases reads 1, 2 or 4 of the kernel's taps. This
rewrites every such ConvTranspose in a float export of the demo UNet's shape and of the student's
(random weights: the question is the graph's speed), checks the outputs agree, and times both in
interleaved rounds. Prints medians and ratios; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SHAPES = {"original (16 … 256 channels)": [16, 32, 64, 128, 256],
          "0.35-width student (6 … 90)": [6, 11, 22, 45, 90]}
# output phase, input offset -> kernel tap of a k=3, s=2, p=1, output_padding=1 ConvTranspose (None: no tap)
TAP = {(0, 0): 1, (0, 1): None, (1, 0): 2, (1, 1): 0}


def subpixel_weights(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Cin, Cout, 3, 3) ConvTranspose weights -> (4·Cout, Cin, 2, 2) Conv weights in DepthToSpace's CRD order."""
    cin, cout = weight.shape[:2]
    out = np.zeros((cout, 2, 2, cin, 2, 2), np.float32)
    for a in (0, 1):
        for b in (0, 1):
            for u in (0, 1):
                for v in (0, 1):
                    if TAP[a, u] is not None and TAP[b, v] is not None:
                        out[:, a, b, :, u, v] = weight[:, :, TAP[a, u], TAP[b, v]].T
    return out.reshape(cout * 4, cin, 2, 2), np.repeat(bias, 4)


def rewrite(source: Path, target: Path) -> int:
    """Every k3/s2/p1/op1 ConvTranspose of ``source`` as Conv + DepthToSpace; returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(source)
    weights = {i.name: i for i in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "ConvTranspose" or attrs.get("kernel_shape") != [3, 3] or attrs.get("strides") != [2, 2] \
                or attrs.get("pads") != [1, 1, 1, 1] or attrs.get("output_padding") != [1, 1]:
            nodes.append(node)
            continue
        w, b = subpixel_weights(numpy_helper.to_array(weights[node.input[1]]),
                                numpy_helper.to_array(weights[node.input[2]]))
        names = (f"{node.name}_subpixel_w", f"{node.name}_subpixel_b", f"{node.output[0]}_phases")
        model.graph.initializer.extend([numpy_helper.from_array(w, names[0]), numpy_helper.from_array(b, names[1])])
        nodes += [helper.make_node("Conv", [node.input[0], names[0], names[1]], [names[2]], kernel_shape=[2, 2],
                                   pads=[0, 0, 1, 1], name=f"{node.name}_subpixel"),
                  helper.make_node("DepthToSpace", [names[2]], [node.output[0]], blocksize=2, mode="CRD",
                                   name=f"{node.name}_d2s")]
        for name in node.input[1:]:
            model.graph.initializer.remove(weights[name])
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, target)
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    import torch

    from app.core.demo_models import UNET_ARGS
    from app.core.model_card import Architecture
    from app.core.models import build_network
    from app.core.progress import run_to_end
    from compression.cost import measure_latency, onnx_predictor

    batch = np.random.default_rng(0).standard_normal((1, 1, 512, 512)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for label, channels in SHAPES.items():
            torch.manual_seed(0)
            net = build_network(Architecture("UNet", {**UNET_ARGS, "channels": channels})).eval()
            plain, subpixel = Path(folder) / f"{channels[0]}.onnx", Path(folder) / f"{channels[0]}_subpixel.onnx"
            torch.onnx.export(net, torch.zeros(1, 1, 512, 512), plain, input_names=["input"],
                              output_names=["logits"], opset_version=17, dynamo=False)
            count = rewrite(plain, subpixel)
            a, b = (onnx_predictor(p, 1)[0](batch) for p in (plain, subpixel))
            print(f"{label}: {count} ConvTranspose rewritten; max |logit difference| {np.abs(a - b).max():.1e} "
                  f"(largest logit {np.abs(a).max():.2f}); mask agreement {(a.argmax(1) == b.argmax(1)).mean():.5f}")
            files[f"{label}, ConvTranspose"] = plain
            files[f"{label}, sub-pixel Conv"] = subpixel
        for threads in args.threads:
            predictors = {name: onnx_predictor(path, threads)[0] for name, path in files.items()}
            stats = run_to_end(measure_latency(predictors, batch, warmup=3, rounds=args.rounds))
            for label in SHAPES:
                base, new = stats[f"{label}, ConvTranspose"].median_ms, stats[f"{label}, sub-pixel Conv"].median_ms
                print(f"{threads} thread(s)  {label:<30} ConvTranspose {base:6.1f} ms  sub-pixel {new:6.1f} ms  "
                      f"x{base / new:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
