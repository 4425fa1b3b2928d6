"""Every artefact path comes from `pipeline.config.Paths`: no module of pipeline/, flows/, benchmarks/
or examples/ builds `root / "reports" / ...`, `Path("models/c1")` or `dir / "summary.json"` by hand,
so renaming an artefact is one edit (and dvc.yaml, which mirrors Paths, the only other)."""
import ast
import re
from pathlib import Path

import pytest

from pipeline.config import Paths

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "flows", "benchmarks", "examples")
OWNER = Path("pipeline/config/paths.py")   # Paths' own module

# hand-built paths in files that other work owns right now; each entry is (file, source of the
# offending expression). The test fails on an entry that no longer occurs, so the list only shrinks.
ALLOWED = {
    # to be fixed with flows/compare.py
    ("flows/compare.py", 'Path(root) / "params.yaml"'),
    ("flows/compare.py", 'Path(args.root) / "params.yaml"'),
    ("flows/compare.py", '"reports/cycles/"'),
}


def _owned_names() -> tuple[set[str], set[str]]:
    """(top-level names, file names) of every path Paths gives: what nobody else may spell."""
    paths, top, files = Paths("."), set(), set()
    for name, member in vars(Paths).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            got = getattr(paths, name)
        elif callable(member):
            arg = {"segment_preview": "train", "comparison": "policies", "comparison_summary": "policies",
                   "comparison_html": "policies"}.get(name, 1)
            got = getattr(paths, name)(arg)
        else:
            continue
        if isinstance(got, Path) and got.parts:
            top.add(got.parts[0])
            files |= {part for part in got.parts if "." in part.strip(".")}   # file names, not .resume
    return top, files


TOP, FILES = _owned_names()
PATH_CALLS = {"Path", "PurePath", "PosixPath", "joinpath", "join"}   # Path(...), p.joinpath(...), os.path.join


def _text(node) -> str | None:
    """The literal text of a str constant, or an f-string's leading literal (None otherwise)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return None


def _names_artefact(text: str) -> bool:
    parts = [p for p in text.split("/") if p]
    return bool(parts) and (parts[0] in TOP or any(p in FILES for p in parts))


LOOKS_LIKE_PATH = re.compile(r"(%s)/\S*" % "|".join(sorted(re.escape(t) for t in TOP)))


def _docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _paths_class_nodes(tree) -> set[int]:
    return {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "Paths" for n in ast.walk(c)}


def hand_built(source: str) -> list[ast.AST]:
    """Every expression of `source` that spells an artefact path itself."""
    tree = ast.parse(source)
    skip = _docstrings(tree) | _paths_class_nodes(tree)
    skip |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}  # judged whole
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = (node.left, node.right)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            operands = node.args if name in PATH_CALLS else ()
        else:
            operands = ()
        if any((t := _text(o)) is not None and _names_artefact(t) for o in operands):
            found.append(node)
            skip |= {id(n) for n in ast.walk(node)}   # one report per expression
            continue
        # a whole string that is a relative artefact path ("reports/benchmarks.json", f"models/c{k}")
        text = _text(node)
        if text is not None and LOOKS_LIKE_PATH.fullmatch(text) and (
                isinstance(node, ast.Constant) or not any(isinstance(v, ast.Constant) and re.search(r"\s", v.value)
                                                          for v in node.values)):
            found.append(node)
            skip |= {id(n) for n in ast.walk(node)}
    return found


def _scan() -> dict[tuple[str, str], int]:
    hits = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel == OWNER:
                continue
            source = path.read_text()
            for node in hand_built(source):
                hits[(rel.as_posix(), ast.get_source_segment(source, node))] = node.lineno
    return hits


@pytest.mark.parametrize("snippet", [
    'p = root / "reports" / "figures"',
    'p = paths.root / "models" / f"c{k}"',
    'p = out_dir / "summary.json"',
    'p = Path("params.yaml")',
    'p = Path(root).joinpath("data", "prepared")',
    'OUT = "reports/benchmarks.json"',
    'key = f"models/c{cycle}"',
])
def test_the_rule_sees_a_hand_built_path(snippet):
    assert len(hand_built(snippet)) == 1


@pytest.mark.parametrize("snippet", [
    'p = paths.figures / "trends.png"',
    'def f():\n    """Writes reports/summary.json."""',
    'log.warning("reports/sanity.json is unreadable")',
    'raise ValueError(f"models/c{k} is not the checkpoint cycle {k} evaluated")',
    'x = doc["data"]',
    'class Paths:\n    @property\n    def summary(self):\n        return self.root / "reports" / "summary.json"',
])
def test_the_rule_lets_paths_and_prose_pass(snippet):
    assert hand_built(snippet) == []


def test_paths_owns_the_artefact_names_the_rule_guards():
    assert TOP >= {"data", "models", "reports"}
    assert FILES >= {"summary.json", "sanity.json", "latest.json", "dvc.lock", "params.yaml", "metrics.json"}


def test_every_artefact_path_comes_from_paths():
    hits = _scan()
    bad = sorted(f"{f}:{line}: {src}" for (f, src), line in hits.items() if (f, src) not in ALLOWED)
    assert not bad, "artefact paths built by hand; add a Paths member and use it:\n" + "\n".join(bad)
    stale = sorted(f"{f}: {src}" for f, src in ALLOWED if (f, src) not in hits)
    assert not stale, "fixed, so take them off ALLOWED:\n" + "\n".join(stale)
