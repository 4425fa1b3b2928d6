"""Presets for classic setups: partial params files in `params/` (only the keys that differ).

`python -m pipeline.presets NAME [--data-root DIR]` prints the preset as `dvc exp run` arguments
(one `-S key=value` per leaf, shell-quoted), so an experiment records exactly what it changed:

    eval "dvc exp run $(python -m pipeline.presets chexnet --data-root /data/CheXpert-v1.0-small)"

`--apply` writes the merged params.yaml instead (atomically; comments kept). Either way the merged
result is validated first, so a preset with a typo fails before anything runs. Leaves merge into
params.yaml the way `-S` sets them: a nested mapping (e.g. `train.model_kwargs`) gains keys, a list
or scalar is replaced. Keys params.yaml lacks are printed as `++key=value` (DVC's `-S` refuses a
plain `key=value` for a key that does not exist).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import re
import shlex
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, Params, Paths
from pipeline.config.params import _format_error
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

PRESET_DIR = "params"
_MISSING = object()


def list_presets(root: str | Path = ".") -> list[str]:
    return sorted(p.stem for p in (Path(root) / PRESET_DIR).glob("*.yaml"))


def load_preset(name: str, root: str | Path = ".") -> dict:
    path = Path(root) / PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets(root)) or 'none'}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} is not a mapping")
    return data


def leaves(overrides: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for every leaf: a scalar, a list, or an empty mapping."""
    out = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaves(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def merge(base: dict, overrides: dict) -> dict:
    """A copy of `base` with every leaf of `overrides` set (what the `-S` arguments do)."""
    merged = copy.deepcopy(base)
    set_leaves(merged, overrides)
    return merged


def set_leaves(tree, overrides: dict) -> None:
    """Set every leaf of `overrides` in the nested mapping `tree` (a dict or ruamel's CommentedMap),
    creating the sections it lacks."""
    for dotted, value in leaves(overrides):
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = copy.deepcopy(value)


def validate(merged: dict) -> Params:
    from pydantic import ValidationError

    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


# ----- Hydra override values (what `dvc exp run -S` parses) ---------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./\-]*$")
_KEYWORDS = {"null", "true", "false", "nan", "inf"}


def hydra_value(value) -> str:
    """A value in Hydra's override grammar that parses back to `value`: strings are quoted unless
    plainly words or paths (a quoted string is never read as a number, bool or null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _KEYWORDS:
            return value
        return json.dumps(value)  # double-quoted, backslashes and quotes escaped as Hydra reads them
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot express {value!r} ({type(value).__name__}) as a -S value")


def dvc_set_args(overrides: dict, base: dict) -> list[str]:
    """`-S` arguments (unquoted, one list item each) that turn params `base` into `merge(base, overrides)`."""
    args = []
    for dotted, value in leaves(overrides):
        prefix = "" if _get(base, dotted) is not _MISSING else "++"
        args += ["-S", f"{prefix}{dotted}={hydra_value(value)}"]
    return args


def preset_overrides(name: str, root: str | Path = ".", data_root: str | None = None) -> dict:
    overrides = load_preset(name, root)
    if data_root is not None:
        overrides = merge(overrides, {"data": {"root": str(data_root)}})
    return overrides


def resolve(name: str, root: str | Path = ".", params: str | Path | None = None,
            data_root: str | None = None) -> tuple[dict, dict, Params]:
    """(base params, overrides, validated merged Params) for a preset."""
    params_path = Path(params) if params is not None else Paths(root).params
    if not params_path.is_file():
        raise ConfigError(f"params file {str(params_path)!r} not found")
    base = yaml.safe_load(params_path.read_text()) or {}
    overrides = preset_overrides(name, root, data_root)
    try:
        merged = validate(merge(base, overrides))
    except ConfigError as err:
        hint = " (pass --data-root)" if "root is required" in str(err) else ""
        raise ConfigError(f"preset {name}: {err}{hint}") from None
    return base, overrides, merged


def apply(params_path: str | Path, overrides: dict) -> None:
    """Set the overrides in params.yaml in place, atomically; ruamel keeps its comments and layout."""
    params_path = Path(params_path)
    try:
        from ruamel.yaml import YAML
    except ImportError:  # plain YAML: same values, comments lost
        text = yaml.safe_dump(merge(yaml.safe_load(params_path.read_text()) or {}, overrides), sort_keys=False)
    else:
        ryaml = YAML()
        ryaml.preserve_quotes = True
        data = ryaml.load(params_path.read_text())
        set_leaves(data, overrides)
        buf = io.StringIO()
        ryaml.dump(data, buf)
        text = buf.getvalue()
    with atomic_path(params_path) as tmp:
        Path(tmp).write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.presets", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="preset name (a file params/NAME.yaml); none: list them")
    parser.add_argument("--root", default=".", help="project root holding params.yaml and params/")
    parser.add_argument("--params", default=None, help="params file to merge into (default ROOT/params.yaml)")
    parser.add_argument("--data-root", default=None, help="dataset folder (sets data.root)")
    parser.add_argument("--apply", action="store_true", help="write the merged params.yaml instead of printing")
    args = parser.parse_args(argv)
    if args.name is None:
        sys.stdout.write("\n".join(list_presets(args.root)) + "\n")
        return
    try:
        base, overrides, merged = resolve(args.name, args.root, args.params, args.data_root)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if args.apply:
        path = Path(args.params) if args.params else Paths(args.root).params
        apply(path, overrides)
        log.info("%s: preset %s applied (arch %s, source %s)", path, args.name, merged.train.arch,
                 merged.data.source)
        sys.stdout.write(f"{path}: preset {args.name} applied\n")
        return
    sys.stdout.write(shlex.join(dvc_set_args(overrides, base)) + "\n")


if __name__ == "__main__":
    main()
