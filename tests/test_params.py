import dataclasses

import pytest
import yaml

from medseg.params import ParamsError, load_params, params_from_dict
from tests.conftest import REPO


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_project_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.model.name in ("unet", "attention_unet")
    assert params.train.patch_size[-1] == 1 if params.model.spatial_dims == 2 else True
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
        ("model", "name", "resnet", r"'model.name' must be one of 'unet', 'attention_unet'"),
        ("preprocess", "target_spacing", [1.0, 1.0], r"'preprocess.target_spacing' must be a list of 3 number"),
        ("train", "amp", "yes", r"'train.amp' must be boolean"),
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
    raw["model"]["strides"] = [2]
    with pytest.raises(ParamsError, match="one entry fewer"):
        params_from_dict(raw)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
