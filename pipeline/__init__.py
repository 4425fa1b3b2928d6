"""cxr-refine's library. `explain`, `run_cycle` and `load_cycle` (pipeline.api) are importable from here;
they load lazily, so `import pipeline` costs nothing but the check of the interpreter below.

The check fails at once with one line, not at some later import with a traceback: the pinned stack
is resolved and tested on Python 3.11 only (pyproject's requires-python, tests/test_python_version.py).
"""
import sys

SUPPORTED_PYTHON = ((3, 11), (3, 12))   # [from, to): pyproject.toml's requires-python (a test keeps them equal)
REQUIRES_PYTHON = ">={}.{},<{}.{}".format(*SUPPORTED_PYTHON[0], *SUPPORTED_PYTHON[1])

if not SUPPORTED_PYTHON[0] <= tuple(sys.version_info[:2]) < SUPPORTED_PYTHON[1]:
    raise SystemExit(f"error: cxr-refine needs Python {REQUIRES_PYTHON}, and {sys.executable} is "
                     f"{'.'.join(map(str, sys.version_info[:3]))}: use python3.11 (make PYTHON=python3.11)")

_API = ("explain", "run_cycle", "load_cycle", "Explanation", "Cycle")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
