"""Architecture rules that review alone would let slip."""
import ast
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
