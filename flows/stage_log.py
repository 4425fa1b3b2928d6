"""A child process's output (dvc and the stages it runs) into the Prefect run log as it is written.

Each line is logged with the stage that wrote it: dvc prints `Running stage 'x':` before every stage
it runs, so a `dvc repro X` that also reruns stale upstream stages names each line's real stage. A
stage's own log lines (pipeline/stages/common.py's format) keep their level and drop their
timestamp, which the run log has already; dvc's `WARNING:` and `ERROR:` lines keep their level.
Progress bars (tqdm) redraw one line with carriage returns: of those redraws, one every
`progress_every` seconds reaches the log, so a bar shows that a long loop moves without flooding it.
"""
from __future__ import annotations

import codecs
import logging
import os
import re
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Callable

PROGRESS_EVERY_S = 10.0
TAIL_LINES = 15  # the lines a failure message quotes
_RUNNING = re.compile(r"Running stage '([^']+)':")
# "2026-12-05 11:39:24,610 INFO pipeline.training: ..." (stage_main's logging format)
_STAGE_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)")
_DVC_LEVEL = re.compile(r"(WARNING|ERROR): ")  # dvc's own warnings and errors


class StageOutput:
    """Cuts a stream of text into lines (ended by a newline) and progress redraws (tqdm writes each one
    after a carriage return) and logs them, tagged `[stage]`; keeps the last lines for a failure message."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, stage: str,
                 progress_every: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.logger, self.stage, self.progress_every, self.clock = logger, stage, progress_every, clock
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._pending = ""
        self._redraw = False  # the pending text follows a carriage return: a bar being redrawn
        self._offered = ""    # that text, as the last feed left it (already offered to the log)
        self._last_progress: tuple[float, str] | None = None

    def feed(self, text: str) -> None:
        self._pending += text
        while (end := _line_end(self._pending)) is not None:
            piece, sep = self._pending[:end], self._pending[end]
            if sep == "\r" and end + 1 == len(self._pending):
                break  # a \n may follow in the next chunk
            crlf = sep == "\r" and self._pending[end + 1] == "\n"
            self._pending = self._pending[end + (2 if crlf else 1):]
            if sep == "\n" or crlf:
                self._line(piece)
            elif piece != self._offered:
                self._progress(piece)
            self._redraw, self._offered = sep == "\r" and not crlf, ""
        if self._redraw:  # shown at once, as on a terminal, not when the next redraw replaces it
            self._offered = self._pending
            self._progress(self._pending)

    def close(self) -> None:
        """The stream ended: a last line without its newline is still a line."""
        pending, self._pending = self._pending.rstrip("\r"), ""
        self._line(pending)

    def _line(self, text: str) -> None:
        text = text.rstrip()
        if self._redraw and (stage_line := _STAGE_LINE.search(text)) and stage_line.start():
            self._progress(text[:stage_line.start()])  # a log line written over a live bar
            text = text[stage_line.start():]
        self._redraw = False
        if not text.strip():
            return
        if running := _RUNNING.match(text):
            self.stage = running.group(1)
        self.tail.append(text)
        level, message = logging.INFO, text
        if stage_line := _STAGE_LINE.match(text):
            level, message = logging.getLevelName(stage_line.group(1)), stage_line.group(2)
        elif dvc_line := _DVC_LEVEL.match(text):
            level = logging.getLevelName(dvc_line.group(1))
        self.logger.log(level, "[%s] %s", self.stage, message)

    def _progress(self, text: str) -> None:
        text, now = text.strip(), self.clock()
        if not text or (self._last_progress is not None
                        and (now - self._last_progress[0] < self.progress_every or text == self._last_progress[1])):
            return
        self._last_progress = now, text
        self.logger.info("[%s] %s", self.stage, text)


def _line_end(text: str) -> int | None:
    ends = [i for i in (text.find("\n"), text.find("\r")) if i >= 0]
    return min(ends) if ends else None


def run_logged(cmd: list[str], cwd: str | Path, env: dict[str, str], logger: logging.Logger | logging.LoggerAdapter,
               stage: str) -> None:
    """Run `cmd` to its end, its stdout and stderr logged as they come (see StageOutput); a failure
    raises RuntimeError quoting its last lines. Python children run unbuffered, so dvc's `Running
    stage` line reaches the log before the output of the stage it names."""
    out = StageOutput(logger, stage)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        with proc.stdout:
            while chunk := os.read(proc.stdout.fileno(), 65536):  # whatever has been written, at once
                out.feed(decoder.decode(chunk))
        out.feed(decoder.decode(b"", final=True))
        out.close()
        code = proc.wait()
    except BaseException:  # interrupted (Ctrl-C, a cancelled run): the child does not outlive the wait
        proc.kill()
        proc.wait()
        raise
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}):\n" + "\n".join(out.tail))
