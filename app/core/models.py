"""Model variants (files + card) and the loaders that turn them into something that runs.

Formats: an ONNX file, a TorchScript file, a PyTorch ``state_dict`` plus an architecture named
in the card (MONAI networks), and a MONAI bundle folder. Security rules, because a model file
is code as much as data: weights load with ``torch.load(weights_only=True)``; a fully pickled
model or a bundle whose network definition reaches outside ``monai.`` (or runs ``$``
expressions) is refused unless the caller passes ``trust=True`` for that file.

torch, onnx and onnxruntime are imported inside the functions that need them: the GUI process
imports this module for ``open_model`` and the card, never the heavy packages.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.core.model_card import (
    Architecture,
    InputSpec,
    Label,
    ModelCard,
    ModelError,
    Preprocessing,
    load_card,
)

__all__ = [
    "ModelError",
    "ModelVariant",
    "open_model",
    "sha256_file",
    "build_network",
    "load_torch_module",
    "check_onnx_model",
    "MONAI_ARCHITECTURES",
]

# The MONAI networks a card may name for state_dict weights (class names in monai.networks.nets).
MONAI_ARCHITECTURES = ("UNet", "BasicUNet", "SegResNet", "DenseNet121", "DenseNet", "UNETR", "AttentionUnet")
CARD_NAMES = ("card.json", "model-card.json")


@dataclass(frozen=True)
class ModelVariant:
    """A model as files on disk plus its card. Immutable: compression writes new variants."""

    card: ModelCard
    format: str  # "onnx" | "torchscript" | "state_dict" | "bundle"
    files: dict[str, Path] = field(default_factory=dict)  # role -> absolute path
    card_path: Path | None = None
    weights_sha256: str = ""
    trusted: bool = False

    @property
    def main_file(self) -> Path:
        role = {"onnx": "onnx", "torchscript": "torchscript", "state_dict": "weights", "bundle": "bundle"}
        return self.files[role[self.format]]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values() if p.is_file())

    def as_format(self, fmt: str) -> "ModelVariant":
        """The same variant read through another of its files (e.g. the ONNX export)."""
        role = {"onnx": "onnx", "torchscript": "torchscript", "state_dict": "weights"}[fmt]
        if role not in self.files:
            raise ModelError(f"{self.card_path or self.card.name}: the card lists no {role!r} file")
        return replace(self, format=fmt, weights_sha256=sha256_file(self.files[role]))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- opening files


def save_state_dict(state: dict, path: str | os.PathLike) -> None:
    """Write torch weights atomically, byte for byte the same for the same tensors.

    ``torch.save`` to a file names the archive's records after the file, so saving through a
    temporary name gave every save a new SHA-256; saved through memory they are "archive/…".
    """
    import io

    import torch

    from app.core.atomic import atomic_output

    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def open_model(path: str | os.PathLike, trust: bool = False, prefer: str | None = None) -> ModelVariant:
    """Open a card, a model file with a card beside it, or a MONAI bundle folder.

    ``prefer`` picks which of the card's files to run ("onnx", "state_dict", "torchscript");
    by default ONNX when the card lists one, else the weights.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or folder")
    if path.is_dir():
        if (path / "configs" / "metadata.json").is_file():
            return open_bundle(path, trust=trust)
        card_path = _card_beside(path / "_")
        if card_path is None:
            raise ModelError(f"{path}: folder holds neither a card.json nor a MONAI bundle (configs/metadata.json)")
        return _variant_from_card(card_path, trust, prefer)
    if path.suffix.lower() == ".json":
        return _variant_from_card(path, trust, prefer)
    card_path = _card_beside(path)
    if card_path is None:
        raise ModelError(f"{path}: no model card found beside it (expected {path.name}.card.json or card.json)")
    variant = _variant_from_card(card_path, trust, prefer=_format_of(path))
    if variant.main_file.resolve() != path.resolve():
        raise ModelError(f"{path}: the card {card_path.name} describes {variant.main_file.name}, not this file")
    return variant


def _card_beside(path: Path) -> Path | None:
    for candidate in (path.with_name(path.name + ".card.json"), *(path.with_name(n) for n in CARD_NAMES)):
        if candidate.is_file():
            return candidate
    return None


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".ts", ".torchscript") or path.name.endswith(".ts.pt"):
        return "torchscript"
    return "state_dict"


def _variant_from_card(card_path: Path, trust: bool, prefer: str | None) -> ModelVariant:
    card = load_card(card_path)
    files = {role: (card_path.parent / rel).resolve() for role, rel in card.files.items()}
    for role, file in files.items():
        if not file.exists():
            raise ModelError(f"{card_path}: the {role} file {file.name} it names does not exist")
    if card.postprocessing.candidate_filter is not None:
        from app.core.candidate_filter import filter_file

        filter_file(files, card_path)
    fmt = _choose_format(files, prefer, card_path)
    if fmt == "state_dict" and card.architecture is None:
        raise ModelError(f"{card_path}: state_dict weights need an 'architecture' block in the card")
    variant = ModelVariant(card=card, format=fmt, files=files, card_path=card_path, trusted=trust)
    return replace(variant, weights_sha256=sha256_file(variant.main_file))


def _choose_format(files: dict[str, Path], prefer: str | None, card_path: Path) -> str:
    by_role = {"onnx": "onnx", "torchscript": "torchscript", "weights": "state_dict", "bundle": "bundle"}
    available = [by_role[r] for r in ("onnx", "weights", "torchscript", "bundle") if r in files]
    if not available:
        raise ModelError(f"{card_path}: the card's 'files' names no onnx, weights, torchscript or bundle file")
    if prefer is None:
        return available[0]
    if prefer not in available:
        raise ModelError(f"{card_path}: no {prefer} file listed in the card (has {', '.join(available)})")
    return prefer


# ---------------------------------------------------------------- torch loading


def build_network(architecture: Architecture, source: str = "<card>"):
    """Instantiate a MONAI network named in a card, with the card's arguments."""
    import monai.networks.nets as nets

    if architecture.name not in MONAI_ARCHITECTURES:
        raise ModelError(
            f"{source}: architecture {architecture.name!r} is not one MedCompress builds "
            f"(known: {', '.join(MONAI_ARCHITECTURES)})"
        )
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in architecture.args.items()}
    try:
        return getattr(nets, architecture.name)(**args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(f"{source}: cannot build {architecture.name} with the card's args ({exc})") from exc
    except ImportError as exc:  # MONAI's OptionalImportError: e.g. UNETR needs einops
        raise ModelError(f"{source}: {architecture.name} needs a package that is not installed "
                         f"({_first_line(exc)})") from exc


def load_torch_module(variant: ModelVariant, device: str = "cpu"):
    """The variant as an eval-mode ``torch.nn.Module`` on ``device``."""
    loaders = {"state_dict": _load_state_dict_model, "torchscript": _load_torchscript, "bundle": _load_bundle_network}
    if variant.format not in loaders:
        raise ModelError(f"{variant.main_file}: an {variant.format} model runs in ONNX Runtime, not torch")
    module = loaders[variant.format](variant)
    return module.to(device).eval()


def _torch_load_weights(path: Path, trust: bool):
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise ModelError(
                f"{path}: contains pickled Python objects, not only weights; refusing to unpickle it "
                "(open it with trust only if you trust where it came from)"
            ) from exc
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: corrupt or truncated weights file ({_first_line(exc)})") from exc


def _load_state_dict_model(variant: ModelVariant):
    import torch

    path = variant.files["weights"]
    state = _torch_load_weights(path, variant.trusted)
    if isinstance(state, torch.nn.Module):  # only reachable with trust
        return state
    state = _unwrap_state_dict(state, path)
    network = build_network(variant.card.architecture, str(variant.card_path))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{path}: weights do not fit the card's {variant.card.architecture.name} ({_first_line(exc)})"
        ) from exc
    return network


def _unwrap_state_dict(state: Any, path: Path) -> dict:
    # Checkpoints often wrap the weights: {"model": {...}} or {"state_dict": {...}}.
    for key in ("state_dict", "model", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{path}: expected a state_dict (parameter name -> tensor), found {type(state).__name__}")
    return state


def _load_torchscript(variant: ModelVariant):
    import torch

    path = variant.files["torchscript"]
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a readable TorchScript file ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- MONAI bundles


def open_bundle(folder: Path, trust: bool = False) -> ModelVariant:
    """A MONAI bundle folder as a variant; its metadata becomes the card."""
    meta_path = folder / "configs" / "metadata.json"
    meta = _read_json(meta_path)
    config_path = _bundle_config(folder)
    config = _read_json(config_path)
    if "network_def" not in config:
        raise ModelError(f"{config_path}: no network_def in the bundle's inference config")
    if not trust:
        check_bundle_targets(config["network_def"], config_path)
    weights = next((p for p in (folder / "models" / "model.pt", folder / "models" / "model.ts") if p.is_file()), None)
    if weights is None:
        raise ModelError(f"{folder}: bundle has no models/model.pt or models/model.ts")
    card = _card_from_bundle_metadata(meta, meta_path)
    files = {"bundle": folder.resolve(), "weights": weights.resolve(), "config": config_path.resolve()}
    return ModelVariant(card=card, format="bundle", files=files, card_path=meta_path,
                        weights_sha256=sha256_file(weights), trusted=trust)


def _bundle_config(folder: Path) -> Path:
    for name in ("inference.json", "inference.yaml"):
        if (folder / "configs" / name).is_file():
            return folder / "configs" / name
    raise ModelError(f"{folder}: bundle has no configs/inference.json")


def _read_json(path: Path) -> dict:
    try:
        if path.suffix == ".yaml":
            import yaml

            return yaml.safe_load(path.read_text(encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read ({_first_line(exc)})") from exc


def check_bundle_targets(node: Any, source: Path) -> None:
    """Refuse code outside MONAI: ``_target_`` must name ``monai.*``; no ``$`` expressions."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not _is_monai_target(str(target)):
            raise ModelError(
                f"{source}: network_def instantiates {target!r}, which is outside MONAI; "
                "refusing to run it unless you trust this bundle"
            )
        for value in node.values():
            check_bundle_targets(value, source)
    elif isinstance(node, list):
        for value in node:
            check_bundle_targets(value, source)
    elif isinstance(node, str) and node.startswith("$"):
        raise ModelError(f"{source}: network_def runs the Python expression {node!r}; refusing unless trusted")


def _is_monai_target(target: str) -> bool:
    # Bare class names ("UNet") resolve inside monai's own namespaces.
    return target.startswith("monai.") or ("." not in target and target.isidentifier())


def _card_from_bundle_metadata(meta: dict, source: Path) -> ModelCard:
    """Map a bundle's network_data_format onto a card (axes, channels, labels, patch)."""
    try:
        fmt = meta["network_data_format"]
        image = fmt["inputs"]["image"]
        pred = next(iter(fmt["outputs"].values()))
    except (KeyError, StopIteration, TypeError) as exc:
        raise ModelError(f"{source}: metadata.json lacks network_data_format inputs/outputs ({exc})") from exc
    shape = [int(s) for s in image.get("spatial_shape", []) if isinstance(s, (int, float)) or str(s).isdigit()]
    dims = len(image.get("spatial_shape", [])) or 3
    channel_def = pred.get("channel_def") or {str(i): f"class {i}" for i in range(int(pred.get("num_channels", 2)))}
    palette = ("#000000", "#ff4040", "#40c040", "#4080ff", "#ffc000", "#c040ff", "#00c0c0", "#ff80c0")
    labels = tuple(Label(int(k), str(v), palette[int(k) % len(palette)]) for k, v in channel_def.items())
    activation = pred.get("activation", "softmax") if pred.get("activation") in ("softmax", "sigmoid") else "softmax"
    return ModelCard(
        name=meta.get("name", source.parent.parent.name),
        version=str(meta.get("version", "0")),
        task="segmentation" if pred.get("type", "image") == "image" else "classification",
        labels=labels,
        input=InputSpec(axes="NCHW" if dims == 2 else "NCDHW", dims=dims,
                        channels=int(image.get("num_channels", 1)),
                        patch_size=tuple(shape) if len(shape) == dims else None),
        preprocessing=Preprocessing(hu_window=None, clip=False, normalisation="none"),
        output_activation=activation,
        intended_use=meta.get("intended_use", "see the bundle's documentation"),
        training_data=meta.get("data_source", "see the bundle's documentation"),
        description=meta.get("description", ""),
    )


def _load_bundle_network(variant: ModelVariant):
    import torch

    weights = variant.files["weights"]
    if weights.suffix == ".ts":
        return _load_torchscript(replace(variant, files={**variant.files, "torchscript": weights}))
    network = _instantiate_bundle_network(variant)
    state = _unwrap_state_dict(_torch_load_weights(weights, variant.trusted), weights)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not fit the bundle's network_def ({_first_line(exc)})") from exc
    assert isinstance(network, torch.nn.Module)
    return network


def _instantiate_bundle_network(variant: ModelVariant):
    config_path = variant.files["config"]
    if variant.trusted:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(config_path))
        return parser.get_parsed_content("network_def")
    config = _read_json(config_path)
    check_bundle_targets(config["network_def"], config_path)
    return _instantiate_monai(config["network_def"], config, config_path)


def _instantiate_monai(node: Any, config: dict, source: Path):
    """Build a checked network_def without MONAI's expression evaluator (no ``$`` code runs)."""
    import importlib

    if isinstance(node, str) and node.startswith("@"):
        return _instantiate_monai(config.get(node[1:].split("::")[0]), config, source)
    if isinstance(node, list):
        return [_instantiate_monai(v, config, source) for v in node]
    if not isinstance(node, dict) or "_target_" not in node:
        return node
    target = str(node["_target_"])
    module_name, _, cls_name = target.rpartition(".")
    module = importlib.import_module(module_name or "monai.networks.nets")
    kwargs = {k: _instantiate_monai(v, config, source) for k, v in node.items() if not k.startswith("_")}
    try:
        return getattr(module, cls_name)(**kwargs)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{source}: cannot build {target} ({exc})") from exc


# ---------------------------------------------------------------- ONNX checks


def check_onnx_model(path: Path, card: ModelCard) -> None:
    """onnx.checker plus the graph's input/output shapes against the card."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... — all mean "unusable"
        raise ModelError(f"{path}: corrupt or invalid ONNX file ({_first_line(exc)})") from exc
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one image input, the graph has {len(inputs)}")
    check_input_shape(_onnx_dims(inputs[0]), card, str(path))
    check_output_shape(_onnx_dims(model.graph.output[0]), card, str(path))


def _onnx_dims(value_info) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def check_input_shape(dims: list[int | None], card: ModelCard, source: str) -> None:
    """Rank, channels and any fixed spatial size of a model input against the card."""
    want_rank = card.input.dims + 2
    if len(dims) != want_rank:
        raise ModelError(
            f"{source}: model input has rank {len(dims)} but the card says {card.input.axes} "
            f"({card.input.dims}D, rank {want_rank})"
        )
    if dims[1] is not None and dims[1] != card.input.channels:
        raise ModelError(f"{source}: model input has {dims[1]} channels but the card says {card.input.channels}")
    spatial = dims[2:]
    if card.input.patch_size is not None and all(d is not None for d in spatial):
        if tuple(spatial) != tuple(card.input.patch_size):
            raise ModelError(
                f"{source}: model input is fixed at {tuple(spatial)} but the card's patch_size is "
                f"{tuple(card.input.patch_size)}"
            )


def check_output_shape(dims: list[int | None], card: ModelCard, source: str) -> None:
    """Output channels (or classes) against the card's labels and activation."""
    want = card.output_channels
    if card.task == "classification":
        if len(dims) != 2:
            raise ModelError(f"{source}: a classifier must output (batch, classes); model outputs rank {len(dims)}")
    elif len(dims) != card.input.dims + 2:
        raise ModelError(f"{source}: segmentation output has rank {len(dims)}, expected {card.input.dims + 2}")
    if dims[1] is not None and dims[1] != want:
        raise ModelError(
            f"{source}: model outputs {dims[1]} channels but the card's {len(card.labels)} labels with "
            f"{card.output_activation} need {want}"
        )
