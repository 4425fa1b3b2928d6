"""dvc.yaml's code dependencies cannot drift from the code: every module a stage imports (followed
statically through pipeline/, transitively) lies under one of the stage's `deps`, so an edit to any of
them makes `dvc repro` rerun the stage (an edit to the augmentation used to retrain nothing)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = "pipeline"
# runs no stage code: it checks the interpreter and loads the Python API lazily (pipeline/__init__.py)
NOT_FOLLOWED = {"pipeline/__init__.py"}
# params validation imports the model registry and the CAM methods inside its validators to check
# names; that decides whether params load, never what a stage computes, so those imports are not followed
MODULE_LEVEL_ONLY = {"pipeline/config/params.py"}


def module_file(name: str) -> Path | None:
    """The file of module `name` under ROOT (a package's __init__.py), None if not a module of ours."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imported_names(path: Path) -> set[str]:
    """Every module name `path` imports (a `from a import b` gives a and a.b: b may be a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if _rel(path) in MODULE_LEVEL_ONLY else ast.walk(tree)
    package = path.relative_to(ROOT).parent.parts
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = (*package[:len(package) - node.level + 1], *(node.module or "").split(".")) if node.level \
                else tuple((node.module or "").split("."))
            base = ".".join(p for p in parts if p)
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def import_closure(module: str) -> set[str]:
    """The files (relative to ROOT) of `module` and of every pipeline module it imports, transitively;
    importing a.b.c runs a/__init__.py and a/b/__init__.py too."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name.split(".")[0] != PACKAGE:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is None or _rel(path) in seen or _rel(path) in NOT_FOLLOWED:
                continue
            seen.add(_rel(path))
            todo.extend(imported_names(path))
    return seen


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def dvc_stages() -> dict[str, tuple[str, list[str]]]:
    """{address: (cmd, dep paths)} of every stage, foreach expanded, as dvc itself reads dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {s.addressing: (s.cmd, [d.def_path for d in s.deps]) for s in repo.index.stages}


STAGES = dvc_stages()
STAGE_MODULE = re.compile(r"^python -m (pipeline\.stages\.\w+)(\s|$)")


def test_the_closure_follows_imports_the_way_python_runs_them():
    files = import_closure("pipeline.stages.evaluate")
    assert {"pipeline/stages/evaluate.py", "pipeline/evaluation.py", "pipeline/stages/common.py",
            "pipeline/config/paths.py", "pipeline/metrics/classification.py"} <= files
    assert "pipeline/metrics/__init__.py" in files          # a package runs on the way to its module
    assert "pipeline/cam/all_labels.py" in files            # through `from pipeline.cam.all_labels import ...`
    assert "pipeline/__init__.py" not in files and not any(f.startswith("pipeline/viewer/") for f in files)
    # relative imports resolve against the importing module's package
    assert "pipeline.data.store" in imported_names(ROOT / "pipeline" / "data" / "dataset.py")


def test_every_stage_runs_a_stage_module():
    assert STAGES and {"prepare", "train_baseline", "evaluate_baseline", "report"} <= set(STAGES)
    for address, (cmd, _) in STAGES.items():
        assert STAGE_MODULE.match(cmd), f"{address}: {cmd!r} is not `python -m pipeline.stages.<name>`"


@pytest.mark.parametrize("address", sorted(STAGES))
def test_the_stage_depends_on_every_module_it_imports(address):
    cmd, deps = STAGES[address]
    module = STAGE_MODULE.match(cmd).group(1)
    missing = sorted(f for f in import_closure(module)
                     if not covered(f, deps) and (ROOT / f).read_text().strip())  # an empty __init__ runs nothing
    assert not missing, f"dvc.yaml: stage {address} imports these but lists none of them (or a folder above) " \
                        f"in its deps:\n" + "\n".join(missing)
