"""The viewer's private upload folder: made per process, removed on exit, swept when its owner is gone.

Uploads are patient files, so the folder must not outlive the viewer. A clean exit (SIGTERM, SIGINT,
the end of `main`) removes it (`pipeline/viewer/server.py`); a SIGKILL cannot, so every viewer, as
it starts, removes the folders of viewers that are no longer running. The owner is written into the
folder's name — `cxr-viewer-<pid>-<start time>-<random>` — so nothing inside it has to be read: a
folder whose process is gone, or whose pid now belongs to a process started at another time, is
stale. A folder of the old unnamed kind (`cxr-viewer-<random>`) is stale once it is an hour old.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "cxr-viewer-"
_OWNED = re.compile(rf"^{PREFIX}(\d+)-(\d+)-[A-Za-z0-9_]+$")
UNOWNED_STALE_S = 3600.0


def process_start(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])   # field 22; the name in (...) may hold spaces
    except (IndexError, ValueError):
        return None


def is_own(path: str | os.PathLike) -> bool:
    """Is `path` a viewer folder made by this process?"""
    m = _OWNED.match(Path(path).name)
    return m is not None and int(m.group(1)) == os.getpid()


def _owner_alive(name: str, now: float, mtime: float) -> bool:
    m = _OWNED.match(name)
    if m is None:   # an older viewer's folder: no owner in its name
        return now - mtime < UNOWNED_STALE_S
    pid, start = int(m.group(1)), int(m.group(2))
    if pid == os.getpid():
        return True
    if not Path("/proc").is_dir():   # no way to tell: leave it
        return True
    return process_start(pid) == start


def sweep_stale(base: str | os.PathLike) -> list[Path]:
    """Remove the viewer folders under `base` whose owner is not running; return them."""
    removed, now, uid = [], time.time(), os.getuid()
    for path in Path(base).glob(f"{PREFIX}*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.is_dir() or path.is_symlink() or st.st_uid != uid:
            continue
        if _owner_alive(path.name, now, st.st_mtime):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        log.info("removed %d upload folder(s) left by viewers that are no longer running", len(removed))
    return removed


def make_private_dir(base: str | os.PathLike | None = None) -> Path:
    """A new 0700 folder under `base` (default: the system temp dir) named for this process, after
    sweeping the stale ones there."""
    base = Path(base or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    sweep_stale(base)
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-{process_start(pid) or 0}-", dir=base))


def remove(path: str | os.PathLike | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
