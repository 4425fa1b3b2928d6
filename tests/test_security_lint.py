"""The unsafe-loader lint (the reliability suite's safe loading): no torch.load without a literal
`weights_only=True`, no pickle-family loader outside tests, and no YAML load that can construct
objects, anywhere in the code. The lint is an AST walk (`unsafe_loads`); the parametrized snippets
show what it flags and what it lets pass.
"""
from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT
from tests.reliability import record

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

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
