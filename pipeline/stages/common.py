"""What every stage entry point shares: logging, params, paths, one-line errors, thread count, and
which cycle a per-cycle stage runs.

dvc.yaml's per-cycle stages (`foreach: ${cycles}`) interpolate nothing into their commands: dvc
pastes interpolated params into `cmd` and hands the line to a shell before any validation runs, so
`--cycle ${item.id}` with `cycles.c1.id='1; touch x'` ran `touch x`. Instead the command is the bare
`python -m pipeline.stages.<name>`, and the stage finds its cycle from the address dvc gives every
stage command in $DVC_STAGE (`train@c1`), whose key it looks up in the params the config loader has
validated (cycle keys `c<id>`, integer ids).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.compute import set_threads
from pipeline.config import ConfigError, Params, Paths, load_params
from pipeline.cycle_control import STOPPED, stop_reason_before
from pipeline.io import atomic_path, write_json, write_text

DVC_STAGE = "DVC_STAGE"  # dvc sets it for every stage command it runs: the stage's address


def stage_main(name: str, body: Callable[[Params, Paths, argparse.Namespace], None],
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse args, load params once, run `body`; a bad param or input exits 2 with one line."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{name}")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".", help="project root holding data/ models/ reports/")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("CXR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(f"pipeline.stages.{name}")
    try:
        params = load_params(args.params)
        if "cycle" in vars(args):
            args.cycle = stage_cycle(name, args.cycle, params, os.environ.get(DVC_STAGE))
        set_threads(params.compute.threads)
        body(params, Paths(args.root, audit=params.audit.enabled), args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        log.error("%s failed: %s", name, err)
        sys.exit(2)


def cycle_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycle", type=int, default=None,
                        help=f"the cycle to run (default: the foreach key of ${DVC_STAGE}, e.g. train@c1)")


def stage_cycle(name: str, cycle: int | None, params: Params, address: str | None) -> int:
    """The cycle stage `name` runs: `--cycle` when given (cycle 0's stages, direct runs), else the
    cycle whose key ends dvc's stage address (`train@c1`, or `sub/dvc.yaml:train@c1`).

    The key is only looked up among the validated `params.cycles`, never parsed for a number, so
    whatever the address holds becomes a ConfigError, not a cycle."""
    if cycle is not None:
        return cycle
    if not address:
        raise ConfigError(f"no cycle: pass --cycle N, or run the stage through dvc (${DVC_STAGE} unset)")
    group, at, key = address.rpartition(":")[2].rpartition("@")
    if not at or group != name:
        raise ConfigError(f"${DVC_STAGE}={address!r} is not a {name}@<cycle> stage; pass --cycle N")
    if key not in params.cycles:
        raise ConfigError(f"${DVC_STAGE}={address!r}: {key!r} is not a cycle of params.yaml "
                          f"(cycles: {', '.join(params.cycles) or 'none'})")
    return params.cycles[key].id


def skip_if_stopped(params: Params, paths: Paths, cycle: int, outs: list[Path]) -> bool:
    """True when the stop rule skipped `cycle` (cycle_control.stop_reason_before); its `outs` (the
    stage's dvc.yaml outputs) are then placeholders: a folder holds stopped.json, a JSON file says
    why, a CSV is empty, an .npz holds no array, a PNG is one black pixel, so DVC records the stage as run."""
    reason = stop_reason_before(params, paths, cycle)
    if reason is None:
        return False
    marker = {"cycle": cycle, STOPPED: reason}
    for out in outs:
        if out.suffix == ".json":
            write_json(out, marker)
        elif out.suffix == ".csv":
            write_text(out, "")
        elif out.suffix == ".npz":
            with atomic_path(out) as tmp, open(tmp, "wb") as fh:
                np.savez(fh)
        elif out.suffix == ".png":
            with atomic_path(out) as tmp:
                Image.new("L", (1, 1)).save(tmp, format="PNG")
        elif not out.suffix:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "stopped.json", marker)
        else:
            raise ValueError(f"no placeholder for {out} of the stopped cycle {cycle}")
    logging.getLogger(__name__).info("cycle %d skipped: %s", cycle, reason)
    return True
