import dataclasses

import pytest
import yaml

from medseg.common.params import ParamsError, load_params, params_from_dict
from tests.conftest import REPO


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_project_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.model.name in ("unet", "attention_unet", "dynunet")
    # every key in the file is a dataclass field and vice versa (defaults never hide a typo in the file)
    assert dataclasses.asdict(params).keys() == raw_params().keys()


def test_missing_key_is_named_with_expected_type():
    raw = raw_params()
    del raw["paths"]["model"]
    with pytest.raises(ParamsError, match=r"missing params key 'paths.model' \(expected string\)"):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "max_epochs", "ten", r"'train.max_epochs' must be integer"),
        ("train", "learning_rate", "fast", r"'train.learning_rate' must be number"),
        ("model", "name", "resnet", r"'model.name' must be one of 'unet', 'attention_unet', 'dynunet'"),
        ("plan", "target_spacing", [1.0, 1.0], r"'plan.target_spacing' must be a list of 3 number or null"),
        ("plan", "spatial_dims", 4, r"'plan.spatial_dims' must be one of 2, 3 or null"),
        ("train", "amp", True, r"'train.amp' must be one of 'fp16', 'bf16', 'off'"),
        ("train", "fold", "some", r"'train.fold' must be integer or one of 'all'"),
        ("model", "deep_supervision", "yes", r"'model.deep_supervision' must be boolean"),
    ],
)
def test_mistyped_key_is_named(section, key, value, message):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


def test_unknown_key_is_rejected():
    raw = raw_params()
    raw["train"]["max_epoch"] = 3
    with pytest.raises(ParamsError, match="unknown params key 'train.max_epoch'"):
        params_from_dict(raw)


def test_inconsistent_network_is_rejected():
    raw = raw_params()
    raw["model"].update(channels=[8, 16, 32], strides=[2])
    with pytest.raises(ParamsError, match="one entry fewer"):
        params_from_dict(raw)
    raw["model"].update(channels=None, strides=[2, 2])
    with pytest.raises(ParamsError, match="model.strides must be null when model.channels is null"):
        params_from_dict(raw)


def test_null_keeps_the_plan_and_values_override_it():
    raw = raw_params()
    raw["plan"].update(target_spacing=None, patch_size=[64, 64, 1], spatial_dims=2)
    params = params_from_dict(raw)
    assert params.plan.target_spacing is None and params.plan.patch_size == (64, 64, 1)


def test_fold_all_trains_every_fold():
    raw = raw_params()
    raw["train"]["fold"] = "all"
    assert params_from_dict(raw).train.folds(5) == [0, 1, 2, 3, 4]
    raw["train"]["fold"] = 5
    with pytest.raises(ParamsError, match=r"'train.fold' must be in 0..4 or 'all'"):
        params_from_dict(raw)


def test_deep_supervision_needs_a_network_that_has_it():
    raw = raw_params()
    raw["model"].update(name="unet", deep_supervision=True)
    with pytest.raises(ParamsError, match="model.deep_supervision"):
        params_from_dict(raw)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.learning_rate", -0.01, r"'train.learning_rate' must be above 0"),
        ("train.learning_rate", 0.0, r"'train.learning_rate' must be above 0"),
        ("train.steps_per_epoch", -3, r"'train.steps_per_epoch' must be at least 1, got -3"),
        ("train.max_epochs", 0, r"'train.max_epochs' must be at least 1, got 0"),
        ("train.augmentation.gamma_prob", 1.5, r"'train.augmentation.gamma_prob' must be at least 0 and at most 1"),
        ("evaluate.sw_overlap", 1.0, r"'evaluate.sw_overlap' must be at least 0 and at most 0.99"),
        ("plan.batch_size", 0, r"'plan.batch_size' must be at least 1"),
    ],
)
def test_out_of_range_value_is_named(key, value, message):
    raw = raw_params()
    section, *path = key.split(".")
    target = raw[section]
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


@pytest.mark.parametrize("text", ["train: [unclosed\n", "- a list\n", "key: value: other\n"])
def test_a_file_that_is_not_params_yaml_is_one_line(tmp_path, capsys, text):
    from medseg.cli import main

    (tmp_path / "p.yaml").write_text(text)
    assert main(["plan", "--params", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "p.yaml" in err and "Traceback" not in err
