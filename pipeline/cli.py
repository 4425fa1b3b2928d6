"""`cxr-refine`: one command for what `make` runs, from a project directory (params.yaml, dvc.yaml).

Each subcommand starts the entry point its `make` target starts (`python -m flows.refine`, `dvc repro`,
...) in a child interpreter with the Makefile's environment (pipeline.launch), and forwards the
options: `cxr-refine run --dask-address ADDR` is `python -m flows.refine --dask-address ADDR`, and
`cxr-refine run --help` shows that entry point's own options. A child process rather than an import
keeps the library free of Prefect and DVC (tests/test_layout.py), and each entry point keeps its
one parser. A Python outside the supported range stops in `pipeline/__init__.py`, before this runs.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.launch import NotAProject, child_env, require_project

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Command:
    summary: str                              # one line, for `cxr-refine --help`
    argv: tuple[str, ...]                     # the child's arguments after the interpreter; the user's follow
    then: tuple[str, ...] = ()                # run after it succeeds, without the user's options
    env_options: tuple[tuple[str, str, str], ...] = ()  # (flag, variable, help): settings the entry point
    #                                           reads from the environment only, parsed here
    needs_git: bool = False                   # `make run` creates a git repository where there is none

    def shown(self) -> str:
        steps = [f"python {' '.join(self.argv)}" + ("" if self.env_options else " [options]")]
        if self.then:
            steps.append(f"then python {' '.join(self.then)}")
        return ", ".join(steps)


COMMANDS: dict[str, Command] = {
    "run": Command("the whole refinement cycle through the Prefect flow, then the per-cycle table (make run)",
                   ("-m", "flows.refine"), then=("-m", "pipeline.report"), needs_git=True),
    "repro": Command("the same artefacts with DVC alone, then the per-cycle table (make repro)",
                     ("-m", "dvc", "repro"), then=("-m", "pipeline.report")),
    "compare": Command("the cycle under each enhancement policy as DVC experiments -> reports/policies/ "
                       "(make compare)", ("-m", "flows.compare")),
    "real": Command("the cycle on real films (Kermany, JSRT + SCR) -> reports/real/ (make real)",
                    ("-m", "flows.real")),
    "viewer": Command("the clinician's viewer and REST API on http://127.0.0.1:7860/ (make viewer; users from "
                      "CXR_USERS=name:pw or `cxr-refine users add NAME`)", ("-m", "pipeline.viewer"),
                      env_options=(("--host", "CXR_HOST", "address to listen on (default 127.0.0.1)"),
                                   ("--port", "CXR_PORT", "port (default 7860)"))),
    "bench": Command("the CPU benchmarks -> reports/benchmarks.json (make bench)", ("-m", "benchmarks.run")),
    "presets": Command("list the presets (params/*.yaml), print one as `dvc exp run -S` arguments, or --apply it",
                       ("-m", "pipeline.presets")),
    "fresh-draw": Command("score every cycle again on a freshly drawn phantom population -> reports/fresh_draw.json",
                          ("-m", "pipeline.fresh_draw")),
    "users": Command("the viewer's users file (salted scrypt hashes): `users add NAME`", ("-m", "pipeline.viewer.auth")),
}


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="cxr-refine", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Explainable chest X-ray classification as a data-centric refinement cycle. Run in a "
                    "project directory (the one holding params.yaml and dvc.yaml).",
        epilog=f"commands:\n{listing}\n\n`cxr-refine COMMAND --help` shows a command's options.")
    parser.add_argument("-C", dest="directory", metavar="DIR", help="run in DIR instead of the current directory")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    return parser


def _env_options(name: str, command: Command, args: list[str], env: dict[str, str]) -> None:
    """Parse the options an environment-driven entry point (the viewer) reads from variables into `env`."""
    parser = argparse.ArgumentParser(prog=f"cxr-refine {name}", description=command.summary,
                                     epilog=f"runs {command.shown()}; every other setting is an environment "
                                            "variable (README, Viewer)")
    for flag, variable, text in command.env_options:
        parser.add_argument(flag, dest=variable, metavar=flag.lstrip("-").upper(), help=f"{text}; or ${variable}")
    for variable, value in vars(parser.parse_args(args)).items():
        if value is not None:
            env[variable] = value


def _call(argv: list[str], env: dict[str, str]) -> int:
    """Run a child to its end. Ctrl-C reaches it from the terminal (its process group), so here it only
    waits for the child to finish; SIGTERM and SIGHUP sent to this process are passed on."""
    proc = subprocess.Popen(argv, env=env)
    forward = {sig: signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
               for sig in (signal.SIGTERM, signal.SIGHUP)}
    interrupt = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = proc.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, interrupt)
    return 128 - code if code < 0 else code   # killed by signal N: 128 + N, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    name, command, rest = args.command, COMMANDS[args.command], list(args.args)
    env = child_env()
    wants_help = any(a in HELP_FLAGS for a in rest)
    if command.env_options:
        _env_options(name, command, rest, env)   # exits on --help
        rest = []
    elif wants_help:
        sys.stdout.write(f"cxr-refine {name}: {command.summary}\nruns {command.shown()}; its options:\n\n")
        sys.stdout.flush()
        return _call([sys.executable, *command.argv, *rest], env)
    try:
        if args.directory:
            if not Path(args.directory).is_dir():
                raise NotAProject(f"{args.directory}: no such directory")
            os.chdir(args.directory)
        root = require_project(".")
    except NotAProject as err:
        sys.exit(f"error: {err}")
    if command.needs_git and not (root / ".git").exists():
        try:   # DVC keeps its experiments and locks beside a git repository
            subprocess.run(["git", "init", "-q"], check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            sys.exit(f"error: {root} is not a git repository and `git init` failed ({err})")
    code = _call([sys.executable, *command.argv, *rest], env)
    if code == 0 and command.then:
        code = _call([sys.executable, *command.then], env)
    return code


if __name__ == "__main__":
    sys.exit(main())
