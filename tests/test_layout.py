"""Architecture rules that review alone would let slip."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_never_imports_prefect_or_dvc():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"prefect", "dvc"})
                 for p in (ROOT / "pipeline").rglob("*.py") if _imports(p) & {"prefect", "dvc"}}
    assert not offenders


def test_no_print_in_the_library():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
                 if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert not offenders


# documents that live outside the repository; a citation of one is a dead end for a reader of a clone
ABSENT_DOCS = re.compile(r"\b(DESIGN|DEVELOPERS)\.md\b|\bissues? #?\d+\b", re.IGNORECASE)


def _project_texts():
    for folder in ("pipeline", "flows", "benchmarks", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".yaml", ".txt"} and path.is_file():
                yield path
    for name in ("README.md", "Makefile", "dvc.yaml", "params.yaml", "prefect.yaml", "pyproject.toml"):
        if (ROOT / name).is_file():
            yield ROOT / name


def test_the_references_stay_inside_the_repository():
    """Code and docs point at a module, a README section or docs/, not at documents a clone lacks."""
    cites = {(str(p.relative_to(ROOT)), line.strip()) for p in _project_texts() if p != Path(__file__)
             for line in p.read_text(errors="replace").splitlines() if ABSENT_DOCS.search(line)}
    assert not cites, sorted(cites)


def test_relative_links_in_the_docs_resolve():
    links = [(md, target) for md in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
             for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text())
             if "://" not in target and not target.startswith("mailto:")]
    assert links
    broken = [f"{md.relative_to(ROOT)} -> {t}" for md, t in links if not (md.parent / t).exists()]
    assert not broken, broken
