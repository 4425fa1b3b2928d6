import pytest
import torch

from pipeline.models.checkpoint import CheckpointError, load_model, read_meta, save_model
from pipeline.models.registry import create_model, list_models, model_spec, target_layer


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_runs_and_has_a_cam_layer(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, image_size=128).eval()
    seen = {}
    handle = target_layer(model, name).register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128))
    handle.remove()
    assert out.shape == (2, 3)
    reshape = model_spec(name).reshape
    grid = reshape(seen["o"]) if reshape else seen["o"]
    assert grid.ndim == 4 and grid.shape[0] == 2 and grid.shape[-1] == grid.shape[-2] >= 4


def test_default_model_gives_at_least_8x8_heatmaps_at_128px():
    model = create_model("tinyvgg", 4).eval()
    seen = {}
    target_layer(model, "tinyvgg").register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    model(torch.randn(1, 3, 128, 128))
    assert seen["o"].shape[-2:] == (16, 16)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        create_model("nope", 2)


def test_checkpoint_roundtrip_and_tamper(tmp_path):
    torch.manual_seed(1)
    model = create_model("tinyvgg", 2).eval()
    meta = {"arch": "tinyvgg", "labels": ["Pneumonia", "Cardiomegaly"], "cycle": 0, "thresholds": [0.5, 0.5]}
    path = save_model(tmp_path / "c0", model, meta)
    loaded, got = load_model(tmp_path / "c0")
    assert got["labels"] == meta["labels"] and read_meta(path)["arch"] == "tinyvgg"
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    assert not list((tmp_path / "c0").glob("*.tmp"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "c0")


def test_local_weights_file_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    src = create_model("resnet18", 5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = create_model("resnet18", 2, weights=tmp_path / "w.safetensors")  # head re-initialised
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)
    with pytest.raises(ValueError, match="do not fit tinyvgg"):
        create_model("tinyvgg", 2, weights=tmp_path / "w.safetensors")
    assert model_spec("resnet18").classifier == "fc"
