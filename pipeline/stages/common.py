"""What every stage entry point shares: logging, params, paths, one-line errors, thread count."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

import torch

from pipeline.config import ConfigError, Params, Paths, load_params


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
        if params.train.num_threads:
            torch.set_num_threads(params.train.num_threads)
        body(params, Paths(args.root), args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        log.error("%s failed: %s", name, err)
        sys.exit(2)


def cycle_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycle", type=int, required=True)
