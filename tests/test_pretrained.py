"""Pretrained weights from local files in each library's layout (built here from random models; nothing
is downloaded): torchxrayvision DenseNet-121, torchvision ImageNet state dicts, timm safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pipeline.data.transforms import to_model_input
from pipeline.models.checkpoint import load_model, save_model
from pipeline.models.pretrained import XRV_PATHOLOGIES, label_key, match_labels
from pipeline.models.registry import create_model, model_spec, target_layer

ROOT = Path(__file__).resolve().parents[1]
XRV = {"in_chans": 1, "input_norm": "xrv"}
OURS = ["Pleural Effusion", "Pneumonia", "No Finding", "lung_lesion", "Enlarged Cardiomediastinum"]
ROWS = {0: 7, 1: 8, 3: 14, 4: 17}   # our row -> torchxrayvision's row; "No Finding" has none


def _xrv_densenet() -> nn.Module:
    """The network torchxrayvision's DenseNet is: torchvision's DenseNet-121, 1-channel, 18 outputs."""
    net = torchvision.models.densenet121(weights=None, num_classes=len(XRV_PATHOLOGIES))
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        net.features.conv0.weight.mul_(0.01)       # inputs reach ±1024
        net.classifier.weight.uniform_(-0.1, 0.1)
        net.classifier.bias.copy_(torch.arange(18.0))  # recognisable rows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):      # trained-looking statistics, not the identity
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def xrv(tmp_path_factory):
    """(the torchxrayvision network, its state dict's file, our model loaded from it under seed 1)."""
    torch.manual_seed(0)
    net = _xrv_densenet()
    path = tmp_path_factory.mktemp("xrv") / "xrv-densenet121-all.pt"
    torch.save(net.state_dict(), path)
    torch.manual_seed(1)
    model = create_model("densenet121", len(OURS), weights=path, labels=OURS, **XRV).eval()
    return net, path, model


def _images(n: int = 2, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_label_names_match_across_label_sets():
    assert label_key("Pleural Effusion") == label_key("Effusion") == label_key("effusion")
    assert label_key("Pleural_Thickening") == label_key("pleural thickening")
    assert match_labels(OURS, XRV_PATHOLOGIES) == sorted(ROWS.items())


def test_xrv_densenet_keeps_backbone_rows_and_scaling(xrv):
    net, path, model = xrv
    file = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    fresh = create_model("densenet121", len(OURS), **XRV)
    state = model.state_dict()
    assert state.keys() == file.keys() | {k for k in state if k.endswith("num_batches_tracked")}
    for key, value in file.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    for ours, theirs in ROWS.items():  # shared labels keep the file's rows; the others are the registry's
        torch.testing.assert_close(model.classifier.weight[ours], file["classifier.weight"][theirs], rtol=0, atol=0)
        assert model.classifier.bias[ours] == theirs
    torch.testing.assert_close(model.classifier.weight[2], fresh.classifier.weight[2], rtol=0, atol=0)

    # the pipeline's input in, what torchxrayvision computes on (img / 255) * 2048 - 1024 out
    images = _images()
    raw = torch.as_tensor(images).float().div(255).mul(2048).sub(1024).unsqueeze(1)
    with torch.no_grad():
        expected = net(raw)[:, list(ROWS.values())]
        got = model(to_model_input(images))[:, list(ROWS)]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)

    # 3-channel first convolution (1 -> 3: repeated / 3): the same answer on the grey input
    three = create_model("densenet121", len(OURS), weights=path, labels=OURS, in_chans=3, input_norm="xrv").eval()
    torch.testing.assert_close(three.features.conv0.weight, file["features.conv0.weight"].repeat(1, 3, 1, 1) / 3)
    with torch.no_grad():
        torch.testing.assert_close(three(to_model_input(images))[:, list(ROWS)], got, rtol=1e-4, atol=1e-3)
    assert target_layer(three, "densenet121") is three.features.norm5


def test_xrv_model_round_trips_without_the_weights_file(xrv, tmp_path):
    _, _, model = xrv
    save_model(tmp_path / "c0", model, {"arch": "densenet121", "labels": OURS, "model_kwargs": XRV})
    loaded, meta = load_model(tmp_path / "c0")
    assert meta["model_kwargs"] == XRV
    x = to_model_input(_images())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # the adapter holds no tensors: the checkpoint's keys are a plain DenseNet-121's
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c0" / "model.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(model.state_dict()) and "features.conv0.weight" in fh.keys()
    # Grad-CAM finds its layer and its gradients pass the adapter
    from pipeline.cam.all_labels import AllLabelCAM

    cams = AllLabelCAM(loaded, "densenet121")(x)
    assert cams.shape[:2] == (2, len(OURS)) and torch.isfinite(cams).all()


def test_torchvision_imagenet_state_dict(tmp_path):
    torch.manual_seed(2)
    stock = torchvision.models.resnet18(weights=None).state_dict()   # 1000 ImageNet classes
    torch.save(stock, tmp_path / "resnet18-imagenet.pth")
    torch.manual_seed(3)
    model = create_model("resnet18", 3, weights=tmp_path / "resnet18-imagenet.pth").eval()
    torch.manual_seed(3)
    fresh = create_model("resnet18", 3)
    for key, value in model.state_dict().items():
        expected = fresh.state_dict()[key] if key.startswith("fc.") else stock[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)

    # 3 -> 1 channel: the kernel summed over its channels answers a grey image as the original does
    one = create_model("resnet18", 3, weights=tmp_path / "resnet18-imagenet.pth", in_chans=1).eval()
    torch.testing.assert_close(one.conv1.weight, stock["conv1.weight"].sum(1, keepdim=True))
    one.fc.load_state_dict(model.fc.state_dict())
    x = to_model_input(_images())
    with torch.no_grad():
        torch.testing.assert_close(one(x), model(x), rtol=1e-4, atol=1e-4)

    exact = create_model("resnet18", 3, weights=tmp_path / "resnet18-imagenet.pth", input_norm="imagenet")
    assert exact.conv1.adapter.norm == "imagenet"
    with pytest.raises(ValueError, match="resnet18-imagenet.pth .*not torchxrayvision's"):
        create_model("resnet18", 3, weights=tmp_path / "resnet18-imagenet.pth", input_norm="xrv")


def test_timm_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(4)
    src = timm.create_model("mixer_b16_224", pretrained=False, num_classes=1000, img_size=64).state_dict()
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "model.safetensors"))
    # the Hub's config.json beside it states the normalisation: the model must follow it
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "mixer_b16_224", "pretrained_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "first_conv": "stem.proj", "classifier": "head"}}))
    with pytest.raises(ValueError, match="model.safetensors .*input_norm: inception"):
        create_model("mixer_b16", 2, weights=tmp_path / "model.safetensors", image_size=64)
    model = create_model("mixer_b16", 2, weights=tmp_path / "model.safetensors", image_size=64,
                         in_chans=1, input_norm="inception")
    for key, value in model.state_dict().items():
        if not key.startswith(("head.", "stem.proj.weight")):
            torch.testing.assert_close(value, src[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(model.stem.proj.weight, src["stem.proj.weight"].sum(1, keepdim=True))
    assert model.head.weight.shape == (2, 768)


def _assert_clear(err: pytest.ExceptionInfo, path: Path, *needles: str) -> None:
    msg = str(err.value)
    assert path.name in msg and "\n" not in msg and len(msg) < 600, msg
    for needle in needles:
        assert needle in msg, msg


def test_files_that_do_not_fit_are_refused_clearly(xrv, tmp_path):
    import timm
    from safetensors.torch import save_file

    net, path, _ = xrv
    with pytest.raises(ValueError) as err:   # the weights' input, not the pipeline's
        create_model("densenet121", 2, weights=path)
    _assert_clear(err, path, "torchxrayvision DenseNet-121", "input_norm: xrv")
    with pytest.raises(ValueError) as err:   # another architecture
        create_model("resnet18", 2, weights=path, **XRV)
    _assert_clear(err, path, "(torchxrayvision DenseNet-121) do not fit resnet18")

    pickled = tmp_path / "xrv-whole-model.pt"   # how torchxrayvision ships its weights
    torch.save(net, pickled)
    with pytest.raises(ValueError) as err:
        create_model("densenet121", 2, weights=pickled, **XRV)
    _assert_clear(err, pickled, "not a plain state dict", "model.state_dict()")

    state = torch.load(path, weights_only=True)
    wrong = tmp_path / "wrong-shapes.pt"   # a 2-channel first convolution cannot be adapted either
    torch.save({**state, "features.conv0.weight": torch.zeros(64, 2, 7, 7), "features.norm5.weight": torch.ones(512)},
               wrong)
    with pytest.raises(ValueError) as err:
        create_model("densenet121", 2, weights=wrong, **XRV)
    _assert_clear(err, wrong, "wrong shape ['features.conv0.weight (64, 2, 7, 7) != (64, 1, 7, 7)', "
                              "'features.norm5.weight (512,) != (1024,)']")

    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.block.weight": torch.zeros(4, 4), "decoder.weight": torch.zeros(4)}, str(unknown))
    with pytest.raises(ValueError) as err:
        create_model("resnet18", 2, weights=unknown)
    _assert_clear(err, unknown, "(no known layout) do not fit resnet18", "expected keys like ['conv1.weight'")

    effnet = tmp_path / "timm-effnet.safetensors"   # timm's EfficientNet; the zoo's is torchvision's
    save_file({k: v.contiguous() for k, v in timm.create_model("efficientnet_b0").state_dict().items()}, str(effnet))
    with pytest.raises(ValueError) as err:
        create_model("efficientnet_b3", 2, weights=effnet)
    _assert_clear(err, effnet, "(timm EfficientNet) do not fit efficientnet_b3, built by torchvision")

    with pytest.raises(ValueError, match="3 label names for 2 outputs"):
        create_model("densenet121", 2, weights=path, labels=OURS[:3], **XRV)


def test_the_xrv_preset_uses_the_weights(xrv, tmp_path):
    from pipeline.presets import merge, preset_overrides, resolve, validate

    _, path, _ = xrv
    base, _, params = resolve("chexnet-xrv", ROOT, data_root=str(tmp_path))
    assert params.train.model_kwargs == XRV and params.train.weights is None
    params = validate(merge(base, merge(preset_overrides("chexnet-xrv", ROOT, str(tmp_path)),
                                        {"train": {"weights": str(path)}})))
    tp, labels = params.train, params.data.labels
    model = create_model(tp.arch, len(labels), weights=tp.weights, labels=labels, **tp.model_kwargs)
    file = torch.load(path, weights_only=True)
    assert len(match_labels(labels, XRV_PATHOLOGIES)) == len(labels)   # every output starts from the weights
    for i, j in match_labels(labels, XRV_PATHOLOGIES):
        torch.testing.assert_close(model.classifier.weight[i], file["classifier.weight"][j], rtol=0, atol=0)
    assert model_spec(tp.arch).target_layer == "features.norm5"
    # the config's weightless build (trainable_blocks) knows the adapted model too
    validate(merge(base, merge(preset_overrides("chexnet-xrv", ROOT, str(tmp_path)),
                               {"train": {"trainable_blocks": ["features.conv0", "classifier"]}})))
