"""Opening models: formats, hashes, security refusals and clear messages for bad files."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from app.core.model_card import ModelError, card_to_dict
from app.core.models import load_torch_module, open_model, save_state_dict, sha256_file
from tests.core.model_fixtures import SMALL_UNET_2D, build, segmentation_card, small_unet, write_model


def test_a_card_opens_as_an_immutable_variant_with_the_weights_hash(tmp_path):
    card_path = small_unet(tmp_path)
    variant = open_model(card_path)
    assert variant.format == "onnx"  # the ONNX export is preferred when the card lists one
    assert variant.weights_sha256 == hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest()
    torch_variant = variant.as_format("state_dict")
    assert torch_variant.weights_sha256 == sha256_file(tmp_path / "model.pt")
    with pytest.raises(AttributeError):
        variant.format = "torchscript"


def test_saving_the_same_weights_twice_gives_the_same_sha256(tmp_path):
    import torch

    state = build("UNet", SMALL_UNET_2D).state_dict()
    save_state_dict(state, tmp_path / "a.pt")
    save_state_dict(state, tmp_path / "b" / "model.pt")
    assert sha256_file(tmp_path / "a.pt") == sha256_file(tmp_path / "b" / "model.pt")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b"]  # no temporary file left


def test_a_model_file_finds_its_card_beside_it(tmp_path):
    small_unet(tmp_path)
    assert open_model(tmp_path / "model.pt").format == "state_dict"
    assert open_model(tmp_path / "model.onnx").format == "onnx"
    assert open_model(tmp_path).card.name == "test-unet2d"


def test_state_dict_weights_build_the_card_architecture(tmp_path):
    import torch

    small_unet(tmp_path)
    module = load_torch_module(open_model(tmp_path / "card.json", prefer="state_dict"))
    reference = build("UNet", SMALL_UNET_2D)
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(module(x), reference(x))


@pytest.mark.parametrize("file", ["model.pt", "model.onnx"])
def test_a_truncated_model_file_is_a_message_naming_it(tmp_path, file):
    from app.core.inference import make_runner

    small_unet(tmp_path)
    data = (tmp_path / file).read_bytes()
    (tmp_path / file).write_bytes(data[: len(data) // 3])
    fmt = "onnx" if file.endswith("onnx") else "state_dict"
    with pytest.raises(ModelError, match=rf"{file}: corrupt"):
        make_runner(open_model(tmp_path / "card.json", prefer=fmt))


def test_a_pickled_whole_model_is_refused_unless_trusted(tmp_path):
    import torch

    small_unet(tmp_path)
    torch.save(build("UNet", SMALL_UNET_2D), tmp_path / "model.pt")  # a full pickle, not weights
    with pytest.raises(ModelError, match="pickled Python objects"):
        load_torch_module(open_model(tmp_path / "card.json", prefer="state_dict"))
    trusted = load_torch_module(open_model(tmp_path / "card.json", prefer="state_dict", trust=True))
    assert isinstance(trusted, torch.nn.Module)


def test_a_missing_file_named_in_the_card_is_a_message(tmp_path):
    small_unet(tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelError, match="onnx file model.onnx it names does not exist"):
        open_model(tmp_path / "card.json")


def test_weights_that_do_not_fit_the_card_architecture(tmp_path):
    card_path = small_unet(tmp_path)
    data = json.loads(card_path.read_text())
    data["architecture"]["args"]["channels"] = [4, 8, 32]
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"model\.pt: weights do not fit the card's UNet"):
        load_torch_module(open_model(card_path, prefer="state_dict"))


# ---------------------------------------------------------------- MONAI bundles


def _bundle(tmp_path, network_def):
    import torch

    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    meta = {"name": "tiny", "version": "0.1", "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": [16, 16]}},
        "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "nodule"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    torch.save(build("UNet", SMALL_UNET_2D).state_dict(), folder / "models" / "model.pt")
    return folder


def test_a_monai_bundle_loads_without_trust(tmp_path):
    args = {k: v for k, v in SMALL_UNET_2D.items()}
    folder = _bundle(tmp_path, {"_target_": "monai.networks.nets.UNet", **args})
    variant = open_model(folder)
    assert variant.format == "bundle"
    assert variant.card.input.channels == 1 and variant.card.label_names == ["background", "nodule"]
    module = load_torch_module(variant)
    assert type(module).__name__ == "UNet"


@pytest.mark.parametrize("network_def, word", [
    ({"_target_": "os.system", "command": "echo pwned"}, "os.system"),
    ({"_target_": "monai.networks.nets.UNet", "spatial_dims": "$__import__('os').getpid()"}, "Python expression"),
    ({"_target_": "monai.networks.nets.UNet", "act": {"_target_": "subprocess.Popen", "args": "ls"}}, "subprocess"),
])
def test_a_bundle_reaching_outside_monai_is_refused_without_trust(tmp_path, network_def, word):
    folder = _bundle(tmp_path, network_def)
    with pytest.raises(ModelError, match=rf"inference\.json: .*{word}.*trust"):
        open_model(folder)


def test_trust_lets_a_non_monai_bundle_through_the_check(tmp_path):
    folder = _bundle(tmp_path, {"_target_": "torch.nn.Identity"})
    assert open_model(folder, trust=True).trusted


# ---------------------------------------------------------------- shapes vs card


def test_onnx_channels_differing_from_the_card_is_a_message(tmp_path):
    from app.core.inference import OnnxRunner

    card = segmentation_card(channels=3)
    write_model(tmp_path, card, build("UNet", SMALL_UNET_2D), (1, 1, 16, 16))
    with pytest.raises(ModelError, match=r"model\.onnx: model input has 1 channels but the card says 3"):
        OnnxRunner(open_model(tmp_path / "card.json"))


def test_torch_channels_differing_from_the_card_is_a_message(tmp_path):
    from app.core.inference import TorchRunner

    write_model(tmp_path, segmentation_card(channels=3), build("UNet", SMALL_UNET_2D), (1, 1, 16, 16))
    with pytest.raises(ModelError, match=r"model\.pt: model input has 1 channels but the card says 3"):
        TorchRunner(open_model(tmp_path / "card.json", prefer="state_dict"))


@pytest.mark.parametrize("fmt", ["onnx", "state_dict"])
def test_outputs_differing_from_the_card_labels_is_a_message(tmp_path, fmt):
    from app.core.inference import make_runner

    write_model(tmp_path, segmentation_card(labels=3), build("UNet", SMALL_UNET_2D), (1, 1, 16, 16))
    with pytest.raises(ModelError, match=r"model outputs 2 channels but the card's 3 labels"):
        make_runner(open_model(tmp_path / "card.json", prefer=fmt))


def test_a_fixed_onnx_input_differing_from_the_card_patch_is_a_message(tmp_path):
    from app.core.inference import OnnxRunner

    card = segmentation_card(patch=(32, 32))
    write_model(tmp_path, card, build("UNet", SMALL_UNET_2D), (1, 1, 16, 16), dynamic=False)
    with pytest.raises(ModelError, match=r"fixed at \(16, 16\) but the card's patch_size is \(32, 32\)"):
        OnnxRunner(open_model(tmp_path / "card.json"))


@pytest.mark.parametrize("name, args, out_shape", [
    ("BasicUNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4]}, (1, 2, 32, 32)),
    ("SegResNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "init_filters": 8}, (1, 2, 32, 32)),
    ("DenseNet121", {"spatial_dims": 2, "in_channels": 1, "out_channels": 3}, (1, 3)),
    ("UNETR", {"in_channels": 1, "out_channels": 2, "img_size": [32, 32], "spatial_dims": 2, "feature_size": 4,
               "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, (1, 2, 32, 32)),
])
def test_card_architectures_build_monai_networks(name, args, out_shape):
    import torch

    from app.core.model_card import Architecture
    from app.core.models import build_network

    with torch.inference_mode():
        assert tuple(build_network(Architecture(name, args)).eval()(torch.zeros(1, 1, 32, 32)).shape) == out_shape


def test_an_unknown_architecture_or_bad_args_is_a_message():
    from app.core.model_card import Architecture
    from app.core.models import build_network

    with pytest.raises(ModelError, match="'ResNet9000' is not one MedCompress builds"):
        build_network(Architecture("ResNet9000", {}), "card.json")
    with pytest.raises(ModelError, match="card.json: cannot build UNet"):
        build_network(Architecture("UNet", {"spatial_dims": 2, "bogus": 1}), "card.json")
