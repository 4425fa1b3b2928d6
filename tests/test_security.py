"""Security half of the reliability suite (issue 7): safe loading, auth and routes, known advisories.

- Safe loading: checkpoints (classifier, U-Net) and `train.weights` files that are truncated,
  bit-flipped, edited, for another model, or pickles (one with a payload that would create a marker
  file) each give a one-line ValueError naming the file, and nothing is ever unpickled. An AST lint
  forbids torch.load without a literal `weights_only=True`, and pickle-family loaders outside tests.
- Auth and routes: every route the app registers (FastAPI's and the mounted Gradio app's) refuses an
  anonymous request with 401, except a justified allow-list; path traversal on the file and static
  routes never returns a file; failed logins are throttled (429 + Retry-After) on the REST API and
  on the Gradio login, per user name and per client, and the lock-out ends with its window.
- Known advisories in the viewer stack's installed versions: none. pip-audit first; where it cannot
  look a package up (offline, or an index without per-version data, as here), PyPI's project JSON
  for the packages installed at their latest release. The rest are recorded as not audited (a
  caveat in reports/reliability.json), and the test skips only when neither source answers.

The viewer tests run their own server (tests/viewer_support.start_viewer) with a 5 s throttle window,
so the shared viewer of the other tests is never locked out.
"""
from __future__ import annotations

import ast
import base64
import http.client
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
import torch
import yaml

from tests.conftest import ROOT, tiny_params
from tests.reliability import record
from tests.viewer_support import PASSWORD, USER

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


# =================================================================================================
# Safe loading
# =================================================================================================

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


# -- the lint: no unsafe deserialisation anywhere in the code ------------------------------------

LINTED = ("pipeline", "flows", "benchmarks", "tests")
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
# loaders that unpickle (or unmarshal) whatever a file says: allowed only in tests (which build hostile
# payloads). Every loader of these modules counts, however it is imported (`dill.loads`,
# `from cloudpickle import load`, `shelve.open`, `marshal.loads`, `dill._dill.Unpickler`, ...)
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_NAMES = {"load", "loads", "Unpickler", "_load", "_loads", "_Unpickler", "load_session", "load_module",
                "load_module_asdict", "open", "Shelf", "DbfilenameShelf", "BsdDbShelf"}
PICKLE_LOADS = {"pandas.read_pickle", "torch.jit.load", "numpy.lib.format.read_array"}
NUMPY_LOADS = {"numpy.load"}
# YAML that can build arbitrary Python objects: forbidden everywhere (tests included)
YAML_MODULES = ("yaml", "ruamel.yaml")
YAML_ALWAYS_UNSAFE = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader", "UnsafeLoader",
                      "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
YAML_LOADER_CALLS = {"load", "load_all"}               # safe only with a literal safe Loader
YAML_SAFE_LOADERS = {"SafeLoader", "CSafeLoader"}
RUAMEL_SAFE_TYPS = {"rt", "safe", "base", "rtsc"}      # ruamel.yaml.YAML(typ=...): "unsafe" constructs objects


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_literal(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it imports (`np` -> numpy, `loads` -> pickle.loads, `YAML` -> ruamel.yaml.YAML)."""
    aliases = {"np": "numpy", "pd": "pandas"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _resolve(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The imported dotted name an expression stands for, through import aliases (None: not a name)."""
    name = _dotted(node)
    if name is None:
        return None
    head, _, rest = name.partition(".")
    return aliases.get(head, head) + (f".{rest}" if rest else "")


def _arg(call: ast.Call, position: int, keyword: str) -> ast.AST | None:
    """The argument passed as `keyword` or at `position` (None when absent)."""
    for k in call.keywords:
        if k.arg == keyword:
            return k.value
    return call.args[position] if len(call.args) > position else None


def _yaml_problem(full: str, call: ast.Call, aliases: dict[str, str]) -> str | None:
    """Why a PyYAML / ruamel.yaml call may construct arbitrary objects, or None."""
    module = next((m for m in YAML_MODULES if full.startswith(m + ".")), None)
    if module is None:
        return None
    name = full[len(module) + 1:].rpartition(".")[2]
    if name in YAML_ALWAYS_UNSAFE:
        return f"{full} constructs arbitrary objects"
    if name in YAML_LOADER_CALLS:
        loader = _arg(call, 1, "Loader")
        resolved = _resolve(loader, aliases) if loader is not None else None
        if not (resolved and resolved.partition(".")[0] in ("yaml", "ruamel")
                and resolved.rpartition(".")[2] in YAML_SAFE_LOADERS):
            return f"{full} without a literal SafeLoader / CSafeLoader"
    if module == "ruamel.yaml" and name == "YAML" and any(k.arg is None for k in call.keywords):
        return f"{full}(**kwargs) may pick an unsafe typ"
    if module == "ruamel.yaml" and name == "YAML":
        typ = _arg(call, 0, "typ")
        values = typ.elts if isinstance(typ, (ast.List, ast.Tuple)) else [typ]
        if typ is not None and not all(isinstance(v, ast.Constant) and v.value in RUAMEL_SAFE_TYPS for v in values):
            return f"{full} with a typ other than a literal {'/'.join(sorted(RUAMEL_SAFE_TYPS))}"
    return None


def _pickle_family(full: str) -> bool:
    module, _, name = full.rpartition(".")
    return full in PICKLE_LOADS or (module.partition(".")[0] in PICKLE_MODULES and name in PICKLE_NAMES)


def unsafe_loads(source: str, filename: str = "<snippet>", in_tests: bool = False) -> list[str]:
    """'file:line: why' for each call that could unpickle or construct objects from untrusted data.

    torch.load / torch.serialization.load must pass `weights_only=True` literally (a variable or
    **kwargs could be False); numpy.load must not pass `allow_pickle` other than a literal False;
    pickle-family loaders (pickle, dill, cloudpickle, joblib, shelve, marshal, pandas.read_pickle, ...)
    are forbidden outside tests, as calls or as base classes; yaml.load / load_all need a literal
    SafeLoader or CSafeLoader, yaml's unsafe_load / full_load and unsafe Loader classes and ruamel's
    YAML(typ="unsafe") are forbidden everywhere. Import aliases (`import torch as T`,
    `from pickle import loads as l`) are followed; `pd.read_pickle` counts as pandas.read_pickle.
    """
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and not in_tests:
            for base in node.bases:
                full = _resolve(base, aliases)
                if full and _pickle_family(full):
                    problems.append(f"{filename}:{node.lineno}: a subclass of {full} unpickles "
                                    "(forbidden outside tests)")
        if not isinstance(node, ast.Call):
            continue
        full = _resolve(node.func, aliases)
        if full is None:
            continue
        where = f"{filename}:{node.lineno}"
        # only an imported yaml: ruamel's idiom `yaml = YAML(); yaml.load(s)` is a safe round-trip load
        imported = _dotted(node.func).partition(".")[0] in aliases
        yaml_problem = _yaml_problem(full, node, aliases) if imported else None
        if yaml_problem:
            problems.append(f"{where}: {yaml_problem}")
        elif full in TORCH_LOADS and not _is_literal(node, "weights_only", True):
            problems.append(f"{where}: {full} without a literal weights_only=True")
        elif full in NUMPY_LOADS and any(k.arg == "allow_pickle" or k.arg is None for k in node.keywords) \
                and not _is_literal(node, "allow_pickle", False):
            problems.append(f"{where}: {full} that may allow pickles")
        elif _pickle_family(full) and not in_tests:
            problems.append(f"{where}: {full} unpickles (forbidden outside tests)")
    return problems


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('m.pt')",
    "import torch\ntorch.load('m.pt', weights_only=False)",
    "import torch\nflag = True\ntorch.load('m.pt', weights_only=flag)",
    "import torch\nkw = {}\ntorch.load('m.pt', **kw)",
    "import torch as T\nT.load('m.pt', map_location='cpu')",
    "from torch import load\nload('m.pt')",
    "from torch import load as tl\ntl('m.pt')",
    "import torch.serialization\ntorch.serialization.load('m.pt')",
    "from torch.serialization import load\nload('m.pt')",
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle as pk\npk.loads(b'')",
    "from pickle import loads\nloads(b'')",
    "from pickle import Unpickler\nUnpickler(f).load()",
    "import pandas as pd\npd.read_pickle('x.pkl')",
    "import joblib\njoblib.load('m.joblib')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import numpy\nnumpy.load('x.npy', allow_pickle=flag)",
    "import torch\ntorch.jit.load('m.pt')",
    # issue: YAML that constructs objects, and the rest of the pickle family
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "import yaml\nyaml.load(s, yaml.UnsafeLoader)",
    "import yaml\nyaml.load(s, Loader=yaml.FullLoader)",
    "import yaml\nL = yaml.SafeLoader\nyaml.load(s, Loader=L)",
    "import yaml\nyaml.load_all(s)",
    "from yaml import load\nload(s)",
    "import yaml\nyaml.unsafe_load(s)",
    "import yaml as y\ny.full_load(s)",
    "from yaml import full_load_all\nfull_load_all(s)",
    "import yaml\nyaml.UnsafeLoader(s).get_single_data()",
    "from ruamel.yaml import YAML\nYAML(typ='unsafe').load(s)",
    "import ruamel.yaml\nruamel.yaml.YAML(typ=['unsafe', 'pure']).load(s)",
    "from ruamel.yaml import YAML\nYAML(typ=kind).load(s)",
    "from ruamel.yaml import YAML\nYAML(**kw).load(s)",
    "import ruamel.yaml\nruamel.yaml.load(s)",
    "import dill\ndill.loads(b'')",
    "import dill\ndill.load_session('s.pkl')",
    "from dill import Unpickler\nUnpickler(f).load()",
    "import cloudpickle\ncloudpickle.loads(b'')",
    "from cloudpickle import load as cl\ncl(f)",
    "import shelve\nshelve.open('db')",
    "import shelve\nshelve.Shelf(d)",
    "import marshal\nmarshal.loads(b'')",
    "from marshal import load\nload(f)",
    "import pickle\nclass Mine(pickle.Unpickler):\n    pass",
])
def test_the_lint_flags_unsafe_loading(snippet):
    assert unsafe_loads(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', mmap_mode='r', allow_pickle=False)",
    "from safetensors.torch import load_file\nload_file('m.safetensors')",
    "import json\njson.load(open('x'))",
    "import yaml\nyaml.safe_load('a: 1')",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.load(s, yaml.CSafeLoader)",
    "from yaml import CSafeLoader, load\nload(s, Loader=CSafeLoader)",
    "import yaml\nyaml.safe_load_all(s)",
    "from ruamel.yaml import YAML\nYAML().load(s)",
    "from ruamel.yaml import YAML\nYAML(typ='safe', pure=True).load(s)",
    "import pickle\npickle.dumps(1)",
    "import marshal\nmarshal.dumps(1)",
    "from ruamel.yaml import YAML\nyaml = YAML()\nyaml.load(s)",
])
def test_the_lint_passes_safe_loading(snippet):
    assert unsafe_loads(snippet) == []


def test_the_lint_catches_every_unsafe_loader_at_once():
    """One synthetic module with each loader the lint knows (a line each): every line is flagged."""
    lines = ["import yaml, dill, cloudpickle, shelve, marshal, pickle", "from ruamel.yaml import YAML",
             "yaml.load(s)", "yaml.unsafe_load(s)", "yaml.full_load(s)", "YAML(typ='unsafe').load(s)",
             "dill.loads(b)", "cloudpickle.loads(b)", "shelve.open(p)", "marshal.loads(b)", "pickle.loads(b)"]
    flagged = {int(p.split(":")[1]) for p in unsafe_loads("\n".join(lines), "synthetic.py")}
    assert flagged == set(range(3, len(lines) + 1)), flagged
    # YAML is refused in tests too; the pickle family is allowed there (tests build hostile payloads)
    in_tests = {int(p.split(":")[1]) for p in unsafe_loads("\n".join(lines), "synthetic.py", in_tests=True)}
    assert in_tests == {3, 4, 5, 6}, in_tests
    record("attacks.unsafe_loader_lint", cases=len(lines) - 2, refused=len(flagged), failures=0)


def test_no_unsafe_deserialisation_in_the_code():
    files = sorted(p for d in LINTED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 50
    problems = []
    for path in files:
        rel = path.relative_to(ROOT)
        problems += unsafe_loads(path.read_text(encoding="utf-8"), str(rel), in_tests=rel.parts[0] == "tests")
    assert problems == [], "\n".join(problems)
    record("safe_loading.lint", files=len(files), violations=0)


# =================================================================================================
# Auth and routes
# =================================================================================================

WINDOW_S, MAX_USER, MAX_IP = 5.0, 5, 12
NURSE, NURSE_PW = "nurse", "nurse-password-42"        # users of the hashed users file
DOCTOR, DOCTOR_PW = "doctor", "doctor-password-7"
PORTER, PORTER_PW = "porter", "porter-password-9"    # never logs in before its lock-out is tested (a good
                                                     # login from an address exempts it from that user's lock)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Our own viewer, over a project holding the secrets a traversal would be after: params.yaml,
    a hashed users file (.cxr/users.json) and the id salt (.cxr/id_salt). No model: the gate and
    the throttle sit in front of the engine."""
    from pipeline.viewer.auth import add_user
    from tests.viewer_support import start_viewer

    root = tmp_path_factory.mktemp("guarded")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (root / ".cxr").mkdir()
    salt = uuid.uuid4().hex
    (root / ".cxr" / "id_salt").write_text(salt)
    add_user(root / ".cxr" / "users.json", NURSE, NURSE_PW)
    add_user(root / ".cxr" / "users.json", DOCTOR, DOCTOR_PW)
    add_user(root / ".cxr" / "users.json", PORTER, PORTER_PW)
    viewer = start_viewer(root, f"guarded-{uuid.uuid4().hex[:6]}", extra_env={
        "CXR_AUTH_WINDOW_S": str(WINDOW_S), "CXR_AUTH_MAX_FAILURES": str(MAX_USER),
        "CXR_AUTH_MAX_FAILURES_PER_IP": str(MAX_IP)})
    viewer.salt = salt
    yield viewer
    viewer.stop()


def _routes(root: Path) -> list[tuple[str, str]]:
    """(method, path template) of every route of the app as built by create_app, Gradio's included."""
    from starlette.routing import Mount

    from pipeline.viewer.app import create_app
    from pipeline.viewer.auth import Users

    out: list[tuple[str, str]] = []

    def walk(routes, prefix=""):
        for r in routes:
            if isinstance(r, Mount):
                walk(getattr(r.app, "routes", None) or [], prefix + r.path)
            elif hasattr(r, "effective_candidates"):  # FastAPI's included router
                walk(r.effective_candidates(), prefix)
            else:
                orig = getattr(r, "original_route", r)
                for m in sorted(getattr(orig, "methods", None) or ["WEBSOCKET"]):
                    out.append((m, prefix + r.path))
    walk(create_app(root, users=Users(plain={"x": "y"})).routes)
    return sorted(set(out))


# Anonymous requests that must work, and why. Everything else registered must answer 401.
ALLOWED_ANONYMOUS = {
    ("GET", "/api/v1/health"): "the documented open health check (no data, no model details)",
    ("GET", "/"): "the login page (with no session Gradio serves the login form's config only)",
    ("HEAD", "/"): "the same page's headers",
    ("POST", "/login"): "the login form posts here",
    ("POST", "/login/"): "the same with a trailing slash (Gradio registers both)",
    ("GET", "/theme.css"): "the login page's stylesheet",
    ("GET", "/favicon.ico"): "the login page's icon",
    ("GET", "/assets/{path:path}"): "the login page's JavaScript and CSS, from the installed gradio package",
    ("GET", "/static/{path:path}"): "fonts and scripts of the login page, from the installed gradio package",
}
FILL = {"path": "index.js", "path_or_url": "/etc/hostname", "url_path": "http://127.0.0.1:9/x", "size": "192",
        "component_id": "1", "segment_id": "0", "ext": "ts", "environment": "client", "api_name": "predict",
        "event_id": "0", "session_hash": "abc", "run": "0", "key": "x", "id": "x", "type": "x",
        "file_name": "x"}
BODIES = {"POST": {"json": {"data": [], "fn_index": 0, "session_hash": "abc", "event_id": "0",
                            "trigger_id": 0, "component_id": 0, "fn_name": "x", "hash": "x", "prompt": "x"}}}


def _url(template: str) -> str:
    return re.sub(r"\{([^}:]+)(:path)?\}", lambda m: FILL.get(m.group(1), "x"), template)


def _status(method: str, url: str, **kw) -> tuple[int, bytes]:
    """Status and the first bytes of the body (streams such as the heartbeat never end)."""
    with httpx.stream(method, url, timeout=httpx.Timeout(10, read=3), **kw) as r:
        body = b""
        try:
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > 4096:
                    break
        except httpx.ReadTimeout:
            pass
        return r.status_code, body


def test_every_registered_route_refuses_an_anonymous_request(guarded, tmp_path, monkeypatch):
    for name in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "GRADIO_SSR_MODE"):
        monkeypatch.setenv(name, os.environ.get(name, "False" if name != "HF_HUB_OFFLINE" else "1"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "root").mkdir()
    routes = _routes(tmp_path / "root")
    assert len(routes) > 40 and ("POST", "/api/v1/predict") in routes and ("POST", "/gradio_api/upload") in routes
    assert set(ALLOWED_ANONYMOUS) <= set(routes), set(ALLOWED_ANONYMOUS) - set(routes)
    open_, refused, wrong = [], 0, []
    for method, template in routes:
        if method == "WEBSOCKET":
            continue
        url = guarded.url + _url(template)
        status, body = _status(method, url, **(BODIES.get(method, {})))
        if (method, template) in ALLOWED_ANONYMOUS:
            open_.append((method, template, status))
            continue
        refused += status == 401
        if status != 401:
            wrong.append((method, template, status, body[:120]))
    assert wrong == []
    # the open routes give the login page and nothing more
    status, page = _status("GET", guarded.url + "/")
    assert status == 200 and b"auth_required" in page
    for private in (b"Model card", b"Chest X-ray: PNG", b"phantom", b"upload"):
        assert private not in page.replace(b"auth_message", b""), private
    assert _status("GET", guarded.url + "/api/v1/health")[0] == 200
    # the gate closes an anonymous websocket too, but none is registered: a new one needs a test here
    assert not [p for m, p in routes if m == "WEBSOCKET"]
    record("auth.routes", routes=len(routes), anonymous_401=refused, allowed=len(open_),
           allow_list=sorted(f"{m} {p}" for m, p in ALLOWED_ANONYMOUS))


@contextmanager
def _login(viewer, user=NURSE, password=NURSE_PW):
    """A client holding a Gradio session cookie."""
    with httpx.Client(base_url=viewer.url, timeout=30) as c:
        r = c.post("/login", data={"username": user, "password": password})
        assert r.status_code == 200, r.text
        yield c


def _raw_get(viewer, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET `path` byte for byte (httpx would normalise dot segments and re-encode)."""
    u = urlsplit(viewer.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read(65536)
    finally:
        conn.close()


def _traversals(target: Path, cwd_relative: str | None) -> list[str]:
    """Many spellings of a request for `target` through the file and static routes."""
    abs_ = str(target)
    rel = abs_.lstrip("/")
    up = "../" * 12
    enc = lambda s: s.replace(".", "%2e").replace("/", "%2f")  # noqa: E731
    dbl = lambda s: s.replace(".", "%252e").replace("/", "%252f")  # noqa: E731
    paths = []
    for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/static/", "/assets/", "/svelte/",
                  "/gradio_api/proxy=", "/api/v1/"):
        paths += [route + abs_, route + up + rel, route + enc(up + rel), route + dbl(up + rel),
                  route + up.replace("/", "\\") + rel.replace("/", "\\"), route + "..%2f" * 12 + rel,
                  route + "%2e%2e/" * 12 + rel, route + quote(abs_, safe=""), route + "file://" + abs_,
                  route + "/" + up + rel, route + "....//" * 12 + rel]
    if cwd_relative:
        paths += [f"/gradio_api/file={cwd_relative}", f"/gradio_api/file=./{cwd_relative}",
                  f"/file={cwd_relative}", f"/gradio_api/file={quote(cwd_relative, safe='')}"]
    return paths


def test_path_traversal_never_returns_a_file(guarded):
    root = guarded.root
    params_text = (root / "params.yaml").read_text()
    targets = {
        Path("/etc/passwd"): (b"root:", None),
        root / "params.yaml": (params_text.splitlines()[1].encode(), None),
        root / ".cxr" / "users.json": (b"scrypt$", None),
        root / ".cxr" / "id_salt": (guarded.salt.encode(), None),
        ROOT / "params.yaml": (b"image_size", "params.yaml"),                 # the server's own cwd
        ROOT / "pipeline" / "viewer" / "auth.py": (b"hash_password", "pipeline/viewer/auth.py"),
    }
    with _login(guarded) as client:
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        basic = "Basic " + base64.b64encode(f"{NURSE}:{NURSE_PW}".encode()).decode()
        attempts, statuses = 0, {}
        for target, (content, rel) in targets.items():
            assert target.is_file()
            for path in _traversals(target, rel):
                anon, body = _raw_get(guarded, path)
                assert content not in body, (path, anon)
                # the REST API answers for itself: no such route
                assert anon == 401 or (path.startswith("/api/v1/") and anon == 404), (path, anon, body[:200])
                for headers in ({"Cookie": cookie}, {"Authorization": basic}):
                    status, body = _raw_get(guarded, path, headers)
                    assert content not in body, (path, status)
                    assert status in (400, 401, 403, 404), (path, status, body[:200])
                    statuses[status] = statuses.get(status, 0) + 1
                    attempts += 1
        # an upload whose file name climbs out of the temp dir is stored inside it
        escape = Path("/tmp") / f"cxr-escape-{uuid.uuid4().hex}.txt"
        for name in (f"../../../../../..{escape}", str(escape), "..\\..\\..\\" + escape.name):
            r = client.post("/gradio_api/upload", files=[("files", (name, b"not an image"))])
            assert r.status_code == 200, r.text
            (stored,) = r.json()
            assert Path(stored).resolve().is_relative_to(guarded.temp_dir.resolve()), stored
            assert not escape.exists()
            Path(stored).unlink()
            attempts += 1
    record("auth.traversal", attempts=attempts, leaked=0, statuses={str(k): v for k, v in sorted(statuses.items())})


def _basic(viewer, user, password, **headers) -> httpx.Response:
    return httpx.get(viewer.url + "/api/v1/model", auth=(user, password), headers=headers, timeout=30)


def _authenticated(r: httpx.Response) -> bool:
    """Past the login: 200, or 503 because this viewer has no model."""
    return r.status_code in (200, 503)


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def test_wrong_passwords_lock_out_the_user_on_the_rest_api_until_the_window_ends(guarded):
    t0 = time.monotonic()
    for _ in range(MAX_USER):
        assert _basic(guarded, PORTER, "wrong-password").status_code == 401
    locked = _basic(guarded, PORTER, PORTER_PW)              # the right password, during the lock-out
    assert time.monotonic() - t0 < WINDOW_S, "too slow to test the window"
    assert locked.status_code == 429, locked.text
    assert 1 <= int(locked.headers["retry-after"]) <= WINDOW_S + 1
    assert "try again" in locked.json()["error"]
    assert _basic(guarded, PORTER, "wrong-again").status_code == 429
    # another user from the same client is not locked out by the porter's failures
    assert _authenticated(_basic(guarded, USER, PASSWORD))
    # nor can a spoofed X-Forwarded-For dodge the per-user lock (it is believed from CXR_TRUSTED_PROXIES only)
    assert _basic(guarded, PORTER, PORTER_PW, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 429
    _sleep_until(t0 + WINDOW_S + 0.5)
    assert _authenticated(_basic(guarded, PORTER, PORTER_PW))  # the window passed: the user is back
    record("auth.rate_limit.rest", failures_before_429=MAX_USER, window_s=WINDOW_S,
           correct_password_refused_while_locked=True, other_user_unaffected=True, unlocked_after_window=True)


def test_the_gradio_login_is_throttled_too(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        t0 = time.monotonic()
        for _ in range(MAX_USER):
            r = c.post("/login", data={"username": DOCTOR, "password": "wrong-password"})
            assert r.status_code == 400
        r = c.post("/login", data={"username": DOCTOR, "password": DOCTOR_PW})
        assert time.monotonic() - t0 < WINDOW_S, "too slow to test the window"
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
        assert not c.cookies and c.get("/config").status_code == 401
        # the REST API shares the throttle: the same user is locked out there too
        assert _basic(guarded, DOCTOR, DOCTOR_PW).status_code == 429
        _sleep_until(t0 + WINDOW_S + 0.5)
        r = c.post("/login", data={"username": DOCTOR, "password": DOCTOR_PW})
        assert r.status_code == 200 and c.get("/config").status_code == 200
    record("auth.rate_limit.gradio", failures_before_429=MAX_USER, window_s=WINDOW_S, unlocked_after_window=True)


def test_many_names_from_one_client_lock_out_the_client(guarded):
    """Failures under many names (the earlier tests' may still count) lock out the client address."""
    t0, guesses, r = time.monotonic(), 0, None
    while guesses < MAX_IP:
        r = _basic(guarded, f"guess-{guesses}", "x")
        guesses += 1
        if r.status_code == 429:
            break
        assert r.status_code == 401
    assert time.monotonic() - t0 < WINDOW_S, "too slow to test the window"
    r = _basic(guarded, USER, PASSWORD)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.status_code
    r = httpx.get(guarded.url + "/api/v1/model", headers={"Authorization": "Basic !!!"}, timeout=30)
    assert r.status_code == 429
    assert httpx.get(guarded.url + "/api/v1/health", timeout=30).status_code == 200  # open routes stay open
    _sleep_until(t0 + WINDOW_S + 0.5)
    assert _authenticated(_basic(guarded, USER, PASSWORD))
    record("auth.rate_limit.per_client", failures_per_client_before_429=MAX_IP, window_s=WINDOW_S)


def test_login_throttle_unit():
    from pipeline.viewer.auth import LoginThrottle

    now = [0.0]
    t = LoginThrottle(max_failures=3, window_s=60, max_failures_per_ip=5, clock=lambda: now[0], max_keys=50)
    for _ in range(3):
        assert t.retry_after("1.1.1.1", "ann") is None
        t.failed("1.1.1.1", "ann")
        now[0] += 1
    assert t.retry_after("1.1.1.1", "ann") == 57          # until the first failure (t=0) is 60 s old (now t=3)
    assert t.retry_after("2.2.2.2", "ann") == 57          # per user, from anywhere
    assert t.retry_after("1.1.1.1", "bob") is None        # the client has 3 of its 5
    now[0] = 60.5
    assert t.retry_after("1.1.1.1", "ann") is None        # the oldest failure left the window
    for k in range(5):
        t.failed("3.3.3.3", f"u{k}")
    assert t.retry_after("3.3.3.3", "someone") is not None and t.retry_after("4.4.4.4", "u0") is None
    for k in range(500):                                  # memory stays bounded
        t.failed(f"10.0.{k // 250}.{k % 250}", f"name-{k}")
    assert len(t._failures) <= 50
    with pytest.raises(ValueError):
        LoginThrottle(max_failures=0)


# =================================================================================================
# Known advisories
# =================================================================================================

VIEWER_STACK = ("gradio", "gradio-client", "fastapi", "starlette", "uvicorn", "python-multipart", "pillow",
                "pydicom", "safetensors", "httpx", "pydantic", "numpy", "torch", "jinja2", "orjson",
                "aiofiles", "h11", "anyio", "huggingface-hub", "pylibjpeg", "python-gdcm", "safehttpx")


def _closure(names) -> dict[str, str]:
    """The installed versions of `names` and everything they require (what the venv resolved)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist.version
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def _pip_audit(pins: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], dict[str, list], str | None]:
    """pip-audit over the pins: (audited {name: version}, advisories {name==version: [(id, fixed in)]},
    why it audited nothing or not everything, or None)."""
    req = tmp_path / "viewer-requirements.txt"
    req.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    exe = Path(sys.executable).with_name("pip-audit")
    cmd = [str(exe) if exe.exists() else "pip-audit", "-r", str(req), "--no-deps", "--disable-pip",
           "--progress-spinner", "off", "-f", "json", "--cache-dir", str(tmp_path / "cache"), "--timeout", "20"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {}, {}, "no advisory service answered within 300 s"
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if re.search(r"connect|resolve|network|timed? ?out|HTTPS?Connection|Max retries", proc.stderr, re.I):
            return {}, {}, f"could not reach its advisory service: {last}"
        pytest.fail(f"pip-audit failed (exit {proc.returncode}): {last}")
    deps = report["dependencies"]
    audited = {d["name"]: d["version"] for d in deps if "skip_reason" not in d}
    advisories = {f"{d['name']}=={d['version']}": [(v["id"], v.get("fix_versions")) for v in d["vulns"]]
                  for d in deps if d.get("vulns")}
    skipped = [d["name"] for d in deps if "skip_reason" in d]
    return audited, advisories, (f"{len(skipped)} of {len(deps)} not found on its advisory service "
                                 f"(e.g. {skipped[0]})" if skipped else None)


def _pypi_latest_advisories(pins: dict[str, str]) -> tuple[dict[str, str], dict[str, list], dict[str, tuple]]:
    """PyPI's project JSON (`/pypi/<name>/json`): the `vulnerabilities` of the latest release, from the
    advisory data pip-audit's 'pypi' service reads per version. Exact for an installed version that is
    the latest release; an older one is returned as (installed, latest), not audited.

    Why: the index reachable from this project's machines answers the project endpoint but not the
    per-version one (404), and OSV does not resolve, so pip-audit alone audits nothing here."""
    import httpx

    audited, advisories, older = {}, {}, {}
    with httpx.Client(timeout=20, follow_redirects=True) as client:
        for name, version in sorted(pins.items()):
            try:
                reply = client.get(f"https://pypi.org/pypi/{name}/json")
            except httpx.HTTPError:
                continue
            if reply.status_code != 200:
                continue
            data = reply.json()
            if data["info"]["version"] != version:
                older[name] = (version, data["info"]["version"])
                continue
            audited[name] = version
            found = [(v["id"], v.get("fixed_in")) for v in data.get("vulnerabilities") or [] if not v.get("withdrawn")]
            if found:
                advisories[f"{name}=={version}"] = found
    return audited, advisories, older


def test_pip_audit_finds_no_known_advisory_in_the_viewer_stack(tmp_path):
    """pip-audit first; where it cannot look a package up, PyPI's own advisory data for the packages
    installed at their latest release. Packages that are neither are reported, not passed over."""
    pins = _closure(VIEWER_STACK)
    assert {"gradio", "fastapi", "starlette", "uvicorn", "python-multipart"} <= set(pins)
    audited, advisories, why = _pip_audit(pins, tmp_path)
    service, older = "pip-audit", {}
    if why is not None:
        rest = {n: v for n, v in pins.items() if re.sub(r"[-_.]+", "-", n).lower() not in
                {re.sub(r"[-_.]+", "-", a).lower() for a in audited}}
        more, more_advisories, older = _pypi_latest_advisories(rest)
        if not audited and not more:
            pytest.skip(f"pip-audit {why}; PyPI's project JSON did not answer either (offline machine?)")
        audited, advisories = {**audited, **more}, {**advisories, **more_advisories}
        service = f"pip-audit ({why}), then PyPI's project JSON for the latest releases"
    assert advisories == {}, f"known advisories (id, fixed in): {advisories}"
    caveat = None
    if older:
        caveat = (f"{len(older)} of {len(pins)} packages not audited: older than their latest release, whose "
                  f"advisories only a per-version lookup gives (" + ", ".join(
                      f"{n} {v} < {latest}" for n, (v, latest) in sorted(older.items())) + ")")
    record("pip_audit", packages=len(pins), audited=len(audited), not_audited=len(older), advisories=0,
           service=service, **({"caveat": caveat} if caveat else {}))
