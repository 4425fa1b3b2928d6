"""Safe loading of weights (the reliability suite, `make reliability`): checkpoints (classifier,
U-Net) and `train.weights` files that are truncated, bit-flipped, edited, for another model, or
pickles (one with a payload that would create a marker file) each give a one-line ValueError naming
the file, and nothing is ever unpickled. tests/test_security_lint.py forbids the unsafe loaders in
the code itself.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, tiny_params
from tests.reliability import record

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


class _Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": _Payload(marker)})


def _evil_torch_zip(marker: Path) -> bytes:
    """torch.save's zip format holding a real tensor beside the payload (what a trojaned .pt looks like)."""
    buf = io.BytesIO()
    torch.save({"features.0.0.weight": torch.zeros(1), "x": _Payload(marker)}, buf)
    return buf.getvalue()


def test_the_payload_is_live(tmp_path):
    """Control: an unsafe loader does run the payload, so 'marker absent' below means something."""
    marker = tmp_path / "ran"
    pickle.loads(_evil_pickle(marker))  # the one deliberate unpickling, of our own bytes
    assert marker.exists()


def _flip(data: bytes, pos: int, bit: int = 0x20) -> bytes:
    b = bytearray(data)
    b[pos] ^= bit
    return bytes(b)


def _header_span(data: bytes) -> tuple[int, int]:
    n = struct.unpack("<Q", data[:8])[0]
    return 8, 8 + n


def _classifier_cases(good: bytes, marker: Path) -> dict[str, bytes]:
    start, end = _header_span(good)
    cases = {
        "truncated to half": good[: len(good) // 2],
        "truncated to one byte short": good[:-1],
        "truncated inside the header": good[:20],
        "empty file": b"",
        "header length bit flipped": _flip(good, 3, 0x01),
        "data bit flipped (last byte)": _flip(good, len(good) - 1, 0x01),
        "data bit flipped (first tensor byte)": _flip(good, end, 0x80),
        "metadata edited in place": good.replace(b"Pneumonia", b"Pneumonix", 1),
        "pickle renamed .safetensors": pickle.dumps({"features.0.0.weight": torch.zeros(1)}),
        "malicious pickle": _evil_pickle(marker),
        "malicious torch zip": _evil_torch_zip(marker),
        "random bytes": os.urandom(4096),
        "appended garbage": good + b"\0" * 64,
    }
    for k, pos in enumerate(range(start + 2, end - 2, max(1, (end - start) // 7))):
        cases[f"header byte {pos} flipped"] = _flip(good, pos, 0x04 if k % 2 else 0x40)
    return cases


def _meta_cases(model) -> dict[str, tuple[dict, dict]]:
    """(tensors, metadata) pairs that are valid safetensors files but wrong checkpoints."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ok = {"arch": "tinyvgg", "labels": ["Pneumonia", "Cardiomegaly"]}
    first_conv = next(k for k, v in state.items() if v.ndim == 4)
    reshaped = {**state, first_conv: torch.zeros(1, 1, 1, 1)}
    dropped = {k: v for k, v in state.items() if k != first_conv}
    extra = {**state, "implant.weight": torch.zeros(3)}
    return {
        "no arch": (state, {"labels": ok["labels"]}),
        "no labels": (state, {"arch": "tinyvgg"}),
        "labels not a list": (state, {**ok, "labels": "ab"}),
        "empty labels": (state, {**ok, "labels": []}),
        "unknown arch": (state, {**ok, "arch": "not-a-model"}),
        "another arch": (state, {**ok, "arch": "resnet18"}),
        "label count mismatch": (state, {**ok, "labels": ["a", "b", "c"]}),
        "unknown model option": (state, {**ok, "model_kwargs": {"backdoor": 1}}),
        "model_kwargs not an object": (state, {**ok, "model_kwargs": [1, 2]}),
        "tensor shape mismatch": (reshaped, ok),
        "tensor missing": (dropped, ok),
        "unexpected tensor": (extra, ok),
    }


def _slug(name: str) -> str:
    return re.sub(r"\W+", "_", name)


def _assert_clear(err: BaseException, path: Path) -> None:
    msg = str(err)
    assert isinstance(err, ValueError), type(err)  # what stage_main turns into one line
    assert str(path) in msg or path.name in msg, msg
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 600, msg
    assert "weights_only` set to `False`" not in msg and "weights_only=False" not in msg, msg


def test_tampered_classifier_checkpoints_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from pipeline.models.checkpoint import CheckpointError, load_model, save_model, save_tensors
    from pipeline.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("tinyvgg", 2).eval()
    meta = {"arch": "tinyvgg", "labels": ["Pneumonia", "Cardiomegaly"], "cycle": 0}
    good_path = save_model(tmp_path / "good", model, meta)
    loaded, _ = load_model(good_path)        # control: the untouched file loads, the same model
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    good = good_path.read_bytes()
    marker = tmp_path / "payload-ran"
    n = 0
    for name, data in _classifier_cases(good, marker).items():
        path = tmp_path / _slug(name) / "model.safetensors"
        path.parent.mkdir()
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_model(path.parent)
        _assert_clear(err.value, path)
        n += 1
    for name, (tensors, bad_meta) in _meta_cases(model).items():
        path = tmp_path / _slug(name) / "model.safetensors"
        save_tensors(path, tensors, bad_meta)
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        _assert_clear(err.value, path)
        n += 1
    contiguous = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, header in {"no metadata": None, "metadata not JSON": {"cxr_meta": "{arch: tinyvgg"},
                         "metadata not an object": {"cxr_meta": "[1, 2]"}}.items():
        path = tmp_path / _slug(name) / "model.safetensors"
        path.parent.mkdir()
        save_file(contiguous, str(path), metadata=header)
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        _assert_clear(err.value, path)
        n += 1
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "nowhere")
    _assert_clear(err.value, tmp_path / "nowhere")
    assert not marker.exists()
    record("safe_loading.classifier", cases=n + 1, unpickled=0, refused=n + 1)


def test_tampered_unet_checkpoints_are_refused_by_name(tmp_path):
    from pipeline.models.checkpoint import CheckpointError, save_tensors
    from pipeline.models.registry import create_model
    from pipeline.segmentation import build_unet, load_unet

    encoder = tiny_params()["segment"]["encoder"]
    net = build_unet(encoder)
    meta = {"arch": "smp.Unet", "encoder": encoder, "size": 32, "structures": ["lungs", "heart"]}
    good_path = tmp_path / "unet.safetensors"
    save_tensors(good_path, net.state_dict(), meta)
    load_unet(good_path)  # control
    good = good_path.read_bytes()
    marker = tmp_path / "payload-ran"
    _, end = _header_span(good)
    state = net.state_dict()
    cases = {
        "truncated": good[: len(good) // 3],
        "data bit flipped": _flip(good, end + 100, 0x01),
        "malicious pickle": _evil_pickle(marker),
        "malicious torch zip": _evil_torch_zip(marker),
    }
    n = 0
    for name, data in cases.items():
        path = tmp_path / (_slug(name) + ".safetensors")
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_unet(path)
        _assert_clear(err.value, path)
        n += 1
    wrong = {
        "a classifier checkpoint": (create_model("tinyvgg", 2).state_dict(),
                                    {"arch": "tinyvgg", "labels": ["a", "b"]}),
        "no encoder": (state, {k: v for k, v in meta.items() if k != "encoder"}),
        "unknown encoder": (state, {**meta, "encoder": "no-such-encoder"}),
        "another encoder": (state, {**meta, "encoder": "resnet34" if encoder != "resnet34" else "resnet18"}),
        "size not a number": (state, {**meta, "size": "32; rm -rf /"}),
        "tensor missing": ({k: v for k, v in list(state.items())[1:]}, meta),
    }
    for name, (tensors, bad_meta) in wrong.items():
        path = tmp_path / (_slug(name) + ".safetensors")
        save_tensors(path, tensors, bad_meta)
        with pytest.raises(CheckpointError) as err:
            load_unet(path)
        _assert_clear(err.value, path)
        n += 1
    assert not marker.exists()
    record("safe_loading.unet", cases=n, unpickled=0, refused=n)


def test_train_weights_files_are_never_unpickled(tmp_path):
    """`train.weights` (a local file for create_model): torch files are read with weights_only=True."""
    from safetensors.torch import save_file

    from pipeline.models.registry import create_model

    model = create_model("tinyvgg", 2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "plain.pt")                 # controls: both formats load
    save_file(state, str(tmp_path / "plain.safetensors"))
    for name in ("plain.pt", "plain.safetensors"):
        create_model("tinyvgg", 2, weights=tmp_path / name)
    marker = tmp_path / "payload-ran"
    good = (tmp_path / "plain.safetensors").read_bytes()
    cases = {
        "evil.pt": _evil_pickle(marker),
        "evil.pth": _evil_torch_zip(marker),
        "evil.bin": _evil_torch_zip(marker),
        "evil.ckpt": pickle.dumps(_Payload(marker), protocol=2),
        "evil.safetensors": _evil_pickle(marker),
        "zip-in-safetensors.safetensors": _evil_torch_zip(marker),
        "truncated.safetensors": good[: len(good) // 2],
        "truncated.pt": (tmp_path / "plain.pt").read_bytes()[:300],
        "empty.pt": b"",
        "garbage.pth": b"<html>403 Forbidden</html>",
        "not-a-state-dict.pt": b"",   # filled below: a tensor list, no dict
    }
    buf = io.BytesIO()
    torch.save([torch.zeros(2)], buf)
    cases["not-a-state-dict.pt"] = buf.getvalue()
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as err:
            create_model("tinyvgg", 2, weights=path)
        _assert_clear(err.value, path)
    assert not marker.exists()
    record("safe_loading.train_weights", cases=len(cases), unpickled=0, refused=len(cases))


@pytest.mark.slow
def test_a_stage_reports_a_tampered_checkpoint_in_one_line(tmp_path):
    """The evaluate stage on a malicious checkpoint: exit 2, one 'failed:' line naming the file."""
    project = tmp_path / "project"
    (project / "models" / "c0").mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    marker = tmp_path / "payload-ran"
    weights = project / "models" / "c0" / "model.safetensors"
    weights.write_bytes(_evil_torch_zip(marker))
    proc = subprocess.run([sys.executable, "-m", "pipeline.stages.evaluate", "--cycle", "0", "--params",
                           str(project / "params.yaml"), "--root", str(project)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CXR_LOG_LEVEL": "INFO"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-2000:]
    failed = [line for line in proc.stderr.splitlines() if "evaluate failed:" in line]
    assert len(failed) == 1 and "model.safetensors" in failed[0] and "corrupt" in failed[0], proc.stderr[-2000:]
    assert not marker.exists()
    record("safe_loading.stage", exit_code=proc.returncode, traceback=0)
