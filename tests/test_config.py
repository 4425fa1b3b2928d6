import shutil

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from tests.conftest import ROOT, tiny_params


def write(tmp_path, p):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p))
    return f


def test_defaults_load(tmp_path):
    params = load_params(write(tmp_path, tiny_params()))
    assert params.cycle_ids() == [0, 1, 2]
    assert params.train.arch == "tinyvgg"


@pytest.mark.parametrize("mutate, needle", [
    (lambda p: p["train"].update(arch="nope"), "train.arch: unknown architecture 'nope'"),
    (lambda p: p["data"].update(source="chexpert", root="/does/not/exist"), "data: root '/does/not/exist'"),
    (lambda p: p["data"].update(source="chexpert"), "data: root is required"),
    (lambda p: p.update(cycles={"c1": {"id": 1, "prev": 0}, "c2": {"id": 2, "prev": 0}}), "cycles: c2.prev=0 breaks the chain"),
    (lambda p: p.update(cycles={"c1": {"id": 1, "prev": 0}, "c3": {"id": 3, "prev": 2}}), "cycles: c3.prev=2 breaks the chain"),
    (lambda p: p["enhance"].update(policy="magic"), "enhance.policy"),
    (lambda p: p["train"].update(epochs=0), "train.epochs"),
    (lambda p: p["train"].update(bogus=1), "train.bogus"),
])
def test_bad_params_fail_with_one_line_naming_the_param(tmp_path, mutate, needle):
    p = tiny_params()
    mutate(p)
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, p))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_dvc_set_param_keeps_params_yaml_valid(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml with ruamel: the result must still load."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    with modify_yaml(path) as data:
        data["enhance"]["policy"] = "overlay"
    params = load_params(path)
    assert params.enhance.policy == "overlay" and params == load_params(ROOT / "params.yaml").model_copy(
        update={"enhance": params.enhance})


# tables whose entries are data (one per label or cycle), described once on the table's own line
PARAM_TABLES = {"phantom.prevalence", "chexpert.uncertainty", "cycles"}


def uncommented_knobs(text: str) -> tuple[list[str], int]:
    """(dotted keys of params.yaml leaves without a `# ...` comment on their line, leaves seen). A leaf
    is a key with its value on the same line (a scalar, a list or a flow mapping)."""
    missing, stack, n = [], [], 0   # stack: (indent, key, commented)
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key, _, rest = line.strip().partition(":")
        value, hash_, _ = rest.partition(" #")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k, _ in stack] + [key])
        if not value.strip():           # a block mapping: its children follow, indented
            stack.append((indent, key, bool(hash_)))
            continue
        n += 1
        parent = ".".join(k for _, k, _ in stack)
        in_table = parent in PARAM_TABLES and stack[-1][2]
        if not hash_ and not in_table:
            missing.append(dotted)
    return missing, n


def test_the_comment_rule_sees_a_bare_knob():
    text = "train:\n  epochs: 10   # cycle 0\n  lr: 0.003\ncycles:   # the refinement cycles\n  c1: {id: 1, prev: 0}\n"
    assert uncommented_knobs(text) == (["train.lr"], 3)


def test_every_params_knob_says_what_it_is():
    missing, leaves = uncommented_knobs((ROOT / "params.yaml").read_text())
    assert leaves > 80, leaves   # the parser sees the file's knobs
    assert not missing, f"params.yaml knobs without a `# why / what values` comment: {missing}"
