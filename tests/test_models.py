import pytest
import torch

from pipeline.cam.all_labels import AllLabelCAM
from pipeline.models.checkpoint import CheckpointError, load_model, read_meta, save_model
from pipeline.models.registry import create_model, list_models, model_spec, target_layer


SLOW = {"efficientnet_b7", "resnet152", "vgg19"}  # big variants of families covered by the others


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()])
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

    # one training step moves the weights; then every label's CAM comes out on the layer's grid
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.randn(2, 3, 128, 128)),
                                                                torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    cams = AllLabelCAM(model, name)(torch.randn(2, 3, 128, 128))
    assert cams.shape == (2, 3, *grid.shape[-2:]) and torch.isfinite(cams).all()
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1


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


# ----- builder options (model_kwargs) -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet101", "densenet121", "efficientnet_b3",
                                  pytest.param("vgg16", marks=pytest.mark.slow)])
def test_default_heads_keep_torchvision_keys(name):
    import torchvision

    ours = create_model(name, 5).state_dict()
    stock = getattr(torchvision.models, name)(weights=None, num_classes=5).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in stock.items()}


@pytest.mark.parametrize("name", ["tinyvgg", "resnet18", "densenet121", "efficientnet_b3", "vgg16"])
def test_pool_and_head_options(name):
    torch.manual_seed(0)
    model = create_model(name, 3, head="bn_mlp", pool="max", dropout=0.3).eval()
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm1d in kinds and torch.nn.AdaptiveMaxPool2d in kinds
    head = model.get_submodule(model_spec(name).classifier)
    assert [type(m) for m in head][:3] == [torch.nn.BatchNorm1d, torch.nn.Linear, torch.nn.ReLU]
    assert head[3].p == 0.3 and head[1].out_features == 256
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert create_model(name, 2, head="bn_mlp").get_submodule(model_spec(name).classifier)[3].p == 0.45


def test_dropout_option_keeps_a_linear_heads_keys():
    plain, dropped = create_model("resnet18", 2), create_model("resnet18", 2, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert dropped.fc.dropout.p == 0.5
    assert create_model("efficientnet_b3", 2, dropout=0.1).classifier[0].p == 0.1


@pytest.mark.parametrize("kwargs, needle", [
    ({"hed": "bn_mlp"}, "unknown option 'hed' for resnet50; options: pool, head, dropout"),
    ({"head": "mlp"}, "head='mlp' for resnet50: Input should be 'linear' or 'bn_mlp'"),
    ({"pool": "mean"}, "pool='mean' for resnet50"),
    ({"dropout": 1.0}, "dropout=1.0 for resnet50: Input should be less than 1"),
])
def test_model_kwargs_are_validated_before_building(kwargs, needle):
    from pipeline.models.registry import validate_kwargs

    with pytest.raises(ValueError) as err:
        create_model("resnet50", 2, **kwargs)
    assert needle in str(err.value)
    with pytest.raises(ValueError, match="unknown option 'pool' for vit_b_16"):
        validate_kwargs("vit_b_16", {"pool": "max"})
    assert validate_kwargs("tinyvgg", {"widths": [8, 16], "dropout": 0}) == {"widths": (8, 16), "dropout": 0.0}


def test_config_fails_fast_on_model_kwargs_and_blocks(tmp_path):
    import yaml

    from pipeline.config import ConfigError, load_params

    for train, needle in [({"arch": "efficientnet_b3", "model_kwargs": {"head": "bnmlp"}}, "train.model_kwargs: head="),
                          ({"arch": "resnet101", "trainable_blocks": ["layer4", "fcc"]},
                           "train.trainable_blocks: unknown block 'fcc'; top-level modules: conv1, bn1, layer1"),
                          ({"trainable_last_n": 2, "trainable_blocks": ["classifier"]}, "not both")]:
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"train": train}))
        with pytest.raises(ConfigError) as err:
            load_params(path)
        assert needle in str(err.value)
    path.write_text(yaml.safe_dump({"train": {"arch": "densenet121", "model_kwargs": {"pool": "max"},
                                              "trainable_blocks": ["features.denseblock4", "classifier"]}}))
    assert load_params(path).train.model_kwargs == {"pool": "max"}


def test_checkpoint_rebuilds_the_same_head(tmp_path):
    torch.manual_seed(2)
    kwargs = {"head": "bn_mlp", "pool": "max"}
    model = create_model("resnet18", 2, **kwargs).eval()
    model.fc[0].running_mean.uniform_()  # a buffer that only the same head can hold
    save_model(tmp_path / "c0", model, {"arch": "resnet18", "labels": ["a", "b"], "model_kwargs": kwargs})
    loaded, meta = load_model(tmp_path / "c0")
    assert meta["model_kwargs"] == kwargs and isinstance(loaded.avgpool, torch.nn.AdaptiveMaxPool2d)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    save_model(tmp_path / "c1", model, {"arch": "resnet18", "labels": ["a", "b"]})  # options lost
    with pytest.raises(CheckpointError, match="does not match resnet18"):
        load_model(tmp_path / "c1")


# ----- local weights --------------------------------------------------------------------------------------

def _chexnet_checkpoint(state: dict) -> dict:
    """arnoweng/CheXNet's layout: DataParallel(DenseNet121 wrapper) saved by torch < 0.3."""
    import re

    renamed = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue  # BatchNorm had no counter then
        k = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k)
        k = k.replace("classifier.", "classifier.0.")
        renamed[f"module.densenet121.{k}"] = v
    return {"epoch": 3, "state_dict": renamed, "best_loss": 0.15}


def test_chexnet_style_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    src = create_model("densenet121", 14).state_dict()
    ckpt = _chexnet_checkpoint(src)
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in ckpt["state_dict"]
    assert "module.densenet121.classifier.0.weight" in ckpt["state_dict"]
    torch.save(ckpt, tmp_path / "model.pth.tar")
    model = create_model("densenet121", 14, weights=tmp_path / "model.pth.tar")
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, src[k], rtol=0, atol=0, msg=k)
    three = create_model("densenet121", 3, weights=tmp_path / "model.pth.tar", pool="max")  # new head
    torch.testing.assert_close(three.features.norm5.weight, src["features.norm5.weight"])

    bad = _chexnet_checkpoint(src)
    bad["state_dict"].pop("module.densenet121.features.norm5.weight")
    bad["state_dict"]["module.densenet121.features.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth.tar")
    with pytest.raises(ValueError, match=r"missing \['features.norm5.weight'\], "
                                         r"unexpected \['features.extra.weight'\]"):
        create_model("densenet121", 14, weights=tmp_path / "bad.pth.tar")


def test_torchvision_state_dicts_load_into_any_head(tmp_path):
    import torchvision

    torch.manual_seed(4)
    stock = torchvision.models.efficientnet_b3(weights=None).state_dict()   # 1000 ImageNet classes
    torch.save({f"module.{k}": v for k, v in stock.items()}, tmp_path / "b3.pth")
    for kwargs in ({}, {"head": "bn_mlp", "pool": "max"}):
        model = create_model("efficientnet_b3", 1, weights=tmp_path / "b3.pth", **kwargs)
        torch.testing.assert_close(model.features[8][0].weight, stock["features.8.0.weight"])
    with pytest.raises(ValueError, match="do not fit efficientnet_b4: .*wrong shape"):
        create_model("efficientnet_b4", 1, weights=tmp_path / "b3.pth")


def test_weights_that_need_unpickling_code_are_refused(tmp_path):
    import collections

    torch.save({"state_dict": collections.Counter(a=1), "fn": test_unknown_model}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a plain state dict"):
        create_model("tinyvgg", 2, weights=tmp_path / "evil.pth")


# ----- partial fine-tuning --------------------------------------------------------------------------------

def test_apply_trainable_counts():
    from pipeline.models.freeze import apply_trainable

    model = create_model("resnet18", 2)
    total = sum(p.numel() for p in model.parameters())
    n, t = apply_trainable(model, blocks=["layer4", "fc"])
    expected = sum(p.numel() for p in model.layer4.parameters()) + sum(p.numel() for p in model.fc.parameters())
    assert (n, t) == (expected, total)
    assert not model.conv1.weight.requires_grad and model.layer4[1].conv2.weight.requires_grad
    assert apply_trainable(model, last_n=2) == (512 * 2 + 2, total)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert apply_trainable(model) == (total, total)
    n, _ = apply_trainable(model, blocks=["layer4.1.bn2"])
    assert n == 2 * 512
    with pytest.raises(ValueError, match="unknown block 'layer5'; top-level modules: conv1, bn1, layer1, layer2, "
                                         "layer3, layer4, fc"):
        apply_trainable(model, blocks=["layer5"])
    with pytest.raises(ValueError, match="not both"):
        apply_trainable(model, last_n=1, blocks=["fc"])


def test_frozen_blocks_stay_exactly_as_they_were(tmp_path):
    """Frozen weights and frozen BatchNorm statistics are untouched by training; the rest learns."""
    import numpy as np

    from pipeline.config import AugmentParams
    from pipeline.data.store import ArrayStoreWriter
    from pipeline.models.freeze import apply_trainable
    from pipeline.training import Rows, TrainSpec, train_classifier

    rng = np.random.default_rng(0)
    y = (rng.random((32, 1)) < 0.5).astype(np.float32)
    imgs = rng.integers(0, 60, (32, 32, 32)).astype(np.uint8)
    imgs[y[:, 0] == 1, :16] += 120
    writer = ArrayStoreWriter(tmp_path / "imgs", (32, 32), np.uint8, shard_size=16)
    writer.append(imgs)
    store = writer.close()
    torch.manual_seed(0)
    model = create_model("tinyvgg", 1)
    n, t = apply_trainable(model, blocks=["features.3", "classifier"])
    assert 0 < n < t
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = TrainSpec(epochs=2, lr=3e-3, weight_decay=0.1, batch_size=16, seed=0, augment=AugmentParams())
    idx = np.arange(32)
    train_classifier(model, spec, ["a"], Rows(store, idx[:24], y[:24]), Rows(store, idx[24:], y[24:]), tmp_path / "r")
    after = model.state_dict()
    for k in before:
        if k.startswith(("features.0", "features.1", "features.2")):
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(after["features.3.0.weight"], before["features.3.0.weight"])
    assert not torch.equal(after["features.3.1.running_mean"], before["features.3.1.running_mean"])


def test_cam_leaves_a_partially_frozen_model_frozen():
    from pipeline.cam.all_labels import AllLabelCAM
    from pipeline.models.freeze import apply_trainable

    model = create_model("resnet18", 2)
    apply_trainable(model, blocks=["layer4", "fc"])
    pattern = [p.requires_grad for p in model.parameters()]
    AllLabelCAM(model, "resnet18")(torch.randn(1, 3, 64, 64))
    assert [p.requires_grad for p in model.parameters()] == pattern
