"""The one-pass all-label CAM against grad-cam's own per-label computation, for every registered model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cam.all_labels import METHODS, AllLabelCAM, dataset_cams
from pipeline.cam.library import LibraryCAM, library_sees_layer_output
from pipeline.cam.maps import normalise, resize, upsample
from pipeline.models.registry import create_model, list_models, model_spec

LABELS = 3
SIZE = 64


# same code paths as efficientnet_b3, resnet18 and vgg16 (all run in `make reliability` / `make test-all`)
SLOW_ARCHS = {"efficientnet_b4", "efficientnet_b7", "resnet50", "resnet101", "resnet152", "vgg19"}
# the formulas do not depend on the architecture: the quick run checks every method on these, and
# on the others the architecture-specific part (target layer, tail) with Grad-CAM
# (a plain CNN, a residual one, a token grid)
ALL_METHODS_ARCHS = {"tinyvgg", "resnet18", "vit_b_16"}


def _model(arch: str, seed: int = 0, **model_kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, LABELS, image_size=SIZE, **model_kwargs)
    if arch.startswith("efficientnet"):
        # BatchNorm statistics of one batch, as after training: with the init's (mean 0, var 1) a
        # deep random EfficientNet's activations vanish to ~1e-8 and every map is flat
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.momentum = 1.0
        with torch.no_grad():
            model.train()(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)))
        for m in norms:
            m.momentum = 0.1
    model.eval()
    # torchvision's ViT and timm's Mixer zero their heads at init: every gradient would be zero
    head = model.get_submodule(model_spec(arch).classifier)
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(last.weight, std=0.05)
    return model


def _arch_methods() -> list:
    out = []
    for arch in list_models():
        for method in ["gradcam", "gradcam++", "hirescam", "layercam", "eigencam"]:
            slow = arch in SLOW_ARCHS or (method != "gradcam" and arch not in ALL_METHODS_ARCHS)
            out.append(pytest.param(arch, method, marks=pytest.mark.slow) if slow else (arch, method))
    return out


def _ours(model, arch, x, method="gradcam") -> np.ndarray:
    return resize(AllLabelCAM(model, arch, method)(x), x.shape[-1]).numpy()


def _library(model, arch, x, method="gradcam") -> np.ndarray:
    with LibraryCAM(model, arch, method) as lib:
        return lib(x, list(range(LABELS)))


def _assert_equals_library(model, arch, method="gradcam"):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    ours = _ours(model, arch, x, method)
    with library_sees_layer_output():  # DenseNet: see test_densenet_inplace_relu_is_why_the_library_differs
        ref = _library(model, arch, x, method)
    assert ours.shape == ref.shape == (2, LABELS, SIZE, SIZE)
    assert ref.max() > 0.99  # non-trivial maps
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("arch, method", _arch_methods())
def test_equals_grad_cam_per_label(arch, method):
    _assert_equals_library(_model(arch), arch, method)


@pytest.mark.parametrize("arch, model_kwargs", [
    ("efficientnet_b3", {"head": "bn_mlp", "pool": "max"}),   # the cardiomegaly head
    ("resnet18", {"head": "bn_mlp"}),
    ("densenet121", {"pool": "max", "dropout": 0.2}),
    ("vgg16", {"head": "linear", "pool": "max"}),
    ("tinyvgg", {"head": "bn_mlp", "pool": "max"}),
])
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_heads_and_max_pooling_equal_grad_cam(arch, model_kwargs, method):
    """BatchNorm1d (eval: running statistics) and max pooling (a sparse gradient) in the tail."""
    model = _model(arch, **model_kwargs)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for m in bn:  # non-trivial running statistics, so eval mode matters
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    assert bool(bn) == (model_kwargs.get("head") == "bn_mlp")
    _assert_equals_library(model, arch, method)


def test_densenet_inplace_relu_is_why_the_library_differs():
    """DenseNet applies `F.relu(features, inplace=True)` to norm5's output. grad-cam keeps a reference
    to that tensor as the activation, so it reads the values *after* the ReLU, while its gradient hook
    gives the gradient *before* it. The fast path pairs activations and gradients of the same tensor
    (norm5's output as produced); on the library's mixed pair it would agree exactly."""
    arch, model = "densenet121", _model("densenet121")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    lib = _library(model, arch, x)
    cam = AllLabelCAM(model, arch)
    logits, leaf = cam.forward_with_cut(x)
    grads = cam.label_gradients(logits, leaf, list(range(LABELS)))          # w.r.t. pre-ReLU output
    post_relu = torch.relu(leaf.detach())
    mixed = torch.einsum("lnc,nchw->nlhw", grads.mean(dim=(-2, -1)), post_relu)
    np.testing.assert_allclose(resize(normalise(mixed), SIZE).numpy(), lib, atol=1e-4)
    assert np.abs(_ours(model, arch, x) - lib).max() > 0.05


def test_scorecam_equals_library_with_one_set_of_masked_passes():
    model = _model("tinyvgg")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calls = {"n": 0}
    handle = model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    ours = _ours(model, "tinyvgg", x, "scorecam")
    handle.remove()
    channels = 128  # tinyvgg's last block
    assert calls["n"] == 1 + 2 * -(-channels // 64)  # one cut forward + masked batches, not per label
    np.testing.assert_allclose(ours, _library(model, "tinyvgg", x, "scorecam"), atol=1e-4)


def test_batched_over_images_and_label_subsets():
    model = _model("resnet18")
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    cam = AllLabelCAM(model, "resnet18")
    full = cam(x)
    assert full.shape == (5, LABELS, 2, 2) and full.device == next(model.parameters()).device
    for i in range(5):
        torch.testing.assert_close(cam(x[i:i + 1])[0], full[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(cam(x, labels=[2, 0]), full[:, [2, 0]], atol=1e-6, rtol=0)


def test_model_is_left_as_it_was():
    model = _model("tinyvgg")
    model.classifier.bias.requires_grad_(False)  # a partially frozen model stays partially frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    AllLabelCAM(model, "tinyvgg")(torch.randn(2, 3, SIZE, SIZE))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()].count(False) == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_fallback_when_the_tail_has_no_vmap_rule(monkeypatch):
    model = _model("resnet18")
    x = torch.randn(2, 3, SIZE, SIZE)
    expected = AllLabelCAM(model, "resnet18")(x)
    real_grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    torch.testing.assert_close(AllLabelCAM(model, "resnet18")(x), expected, atol=1e-6, rtol=0)


def test_dataset_cams_are_low_res_float16():
    model = _model("tinyvgg")
    batches = [torch.randn(4, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE)]
    native = list(dataset_cams(model, "tinyvgg", batches))
    assert [b.shape for b in native] == [(4, LABELS, 8, 8), (3, LABELS, 8, 8)]
    assert native[0].dtype == np.float16 and 0 <= native[0].min() and native[0].max() <= 1
    small = next(dataset_cams(model, "tinyvgg", batches[:1], size=4))
    assert small.shape == (4, LABELS, 4, 4)
    up = upsample(native[0], SIZE)
    assert up.shape == (4, LABELS, SIZE, SIZE) and up.max() == pytest.approx(1.0, abs=1e-3)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'gradcam2'"):
        AllLabelCAM(_model("tinyvgg"), "tinyvgg", "gradcam2")
    assert set(METHODS) == {"gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "scorecam"}
