"""Figures the reliability suite measures, collected for `reports/reliability.json`.

A test calls `record("fuzz.decoder", cases=..., crashes=0, ...)` with what it measured. Nothing is
written unless $CXR_RELIABILITY_LOG names a file (set by `make reliability`): each call appends one
JSON line there, and `python -m tests.reliability_report` folds the lines into the report. Record
after the assertions so a recorded figure is one that passed; a failed test is reported by pytest's
own outcome, which the report also reads.
"""
from __future__ import annotations

import json
import os
import time

LOG_ENV = "CXR_RELIABILITY_LOG"


def record(check: str, **figures) -> None:
    """Append `{"check": check, **figures}` to $CXR_RELIABILITY_LOG (a no-op when unset)."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"check": check, "time": time.time(), **figures}, default=float, sort_keys=True)
    with open(path, "a", encoding="utf-8") as fh:  # one short append per call: safe across processes
        fh.write(line + "\n")
