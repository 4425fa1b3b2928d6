"""Presets (params/*.yaml): valid when merged, the same through `dvc exp run -S` as through --apply."""
from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from pipeline.models.freeze import apply_trainable
from pipeline.models.registry import create_model
from pipeline.presets import leaves, list_presets, load_preset, main, merge, resolve

ROOT = Path(__file__).resolve().parents[1]
PRESETS = list_presets(ROOT)


def test_the_classic_setups_are_there():
    assert {"chexnet", "cardiomegaly-effnet-b3", "pneumonia-resnet101"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_merges_into_valid_params_and_only_overrides(name, tmp_path):
    base, overrides, params = resolve(name, ROOT, data_root=str(tmp_path))
    for key, value in leaves(load_preset(name, ROOT)):
        node = base
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        assert node != value, f"{name}: {key} repeats params.yaml's value"
    assert params.data.root == str(tmp_path)


@pytest.mark.parametrize("name", PRESETS)
def test_printed_dvc_args_give_the_same_params(name, tmp_path, capsys):
    """The printed line, split as a shell would and applied by DVC's own `-S` code, equals the merge."""
    from dvc.utils.hydra import apply_overrides

    main([name, "--root", str(ROOT), "--data-root", str(tmp_path)])
    args = shlex.split(capsys.readouterr().out)
    assert args[::2] == ["-S"] * (len(args) // 2)
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_overrides(path, args[1::2])
    _, _, expected = resolve(name, ROOT, data_root=str(tmp_path))
    assert load_params(path) == expected


@pytest.mark.parametrize("name", PRESETS)
def test_apply_writes_the_merged_params_keeping_comments(name, tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    main([name, "--root", str(ROOT), "--params", str(path), "--data-root", str(tmp_path), "--apply"])
    _, _, expected = resolve(name, ROOT, data_root=str(tmp_path))
    assert load_params(path) == expected
    assert "# One section per stage" in path.read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_resnet101_preset_trains_about_38_percent():
    _, _, params = resolve("pneumonia-resnet101", ROOT, data_root=str(ROOT))
    tp = params.train
    model = create_model(tp.arch, 1, **tp.model_kwargs)
    n_train, n_total = apply_trainable(model, tp.trainable_last_n, tp.trainable_blocks)
    assert 0.35 <= n_train / n_total <= 0.41


def test_cardiomegaly_preset_is_128px_with_the_published_head(tmp_path):
    _, _, params = resolve("cardiomegaly-effnet-b3", ROOT, data_root=str(tmp_path))
    assert params.data.image_size == 128
    assert params.train.model_kwargs == {"head": "bn_mlp", "pool": "max"}


@pytest.mark.parametrize("preset, needle", [
    ({"train": {"arch": "densenet12"}}, "train.arch: unknown architecture 'densenet12'"),
    ({"train": {"model_kwargs": {"head": "bn_mpl"}}}, "train.model_kwargs: head='bn_mpl'"),
    ({"train": {"arch": "resnet50", "trainable_blocks": ["layer5"]}}, "train.trainable_blocks: unknown block 'layer5'"),
    ({"data": {"source": "chexpert"}}, "pass --data-root"),
])
def test_a_preset_with_a_typo_fails(preset, needle, tmp_path, capsys):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "bad.yaml").write_text(yaml.safe_dump(preset))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match=None) as err:
        resolve("bad", tmp_path)
    assert needle in str(err.value)
    with pytest.raises(SystemExit, match="error: preset bad"):
        main(["bad", "--root", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve("nope", tmp_path)


def test_merge_sets_leaves_and_keeps_siblings():
    base = {"train": {"model_kwargs": {}, "lr": 1.0, "augment": {"noise": 0.0, "shift": 0.1}}}
    merged = merge(base, {"train": {"model_kwargs": {"head": "bn_mlp"}, "augment": {"noise": 0.1}}})
    assert merged == {"train": {"model_kwargs": {"head": "bn_mlp"}, "lr": 1.0, "augment": {"noise": 0.1, "shift": 0.1}}}
    assert base["train"]["model_kwargs"] == {}


def test_awkward_strings_survive_the_shell_and_hydra(tmp_path, capsys):
    """Spaces, quotes, numbers-as-strings, `null` as a string: quoted for Hydra, then for the shell."""
    from dvc.utils.hydra import apply_overrides

    from pipeline.presets import dvc_set_args, hydra_value

    values = ["it's", "1e-4", "null", "a b", 'say "x"', "/data/x-ray set/1", "True"]
    overrides = {"x": {f"k{i}": v for i, v in enumerate(values)}, "n": 1e-05, "b": False, "l": [1, "two", None]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"x": {}, "n": 0, "b": True, "l": []}))
    line = shlex.join(dvc_set_args(overrides, yaml.safe_load(path.read_text())))
    apply_overrides(path, shlex.split(line)[1::2])
    loaded = yaml.safe_load(path.read_text())
    # ruamel writes 1e-05 without a dot, which PyYAML (YAML 1.1) reads as a string; pydantic's float
    # fields take it back (test_printed_dvc_args_give_the_same_params: chexnet's finetune_lr)
    assert float(loaded.pop("n")) == overrides.pop("n")
    assert loaded == overrides
    assert hydra_value("layer4") == "layer4" and hydra_value("1e-4") == '"1e-4"'
