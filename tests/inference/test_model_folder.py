"""The model folder contract: which files a model path names, loading them without running code, config updates."""

import json

import pytest
import torch

from medseg.common.errors import StageInputError
from medseg.inference.model_folder import (CONFIG_NAME, MODEL_NAME, fold_dir, largest_component_classes, load_trained,
                                 model_files, update_config)
from tests.inference.test_sliding_window import inference_config, write_folds, write_model


def test_load_trained_takes_a_parent_folder_a_fold_folder_or_a_model_file(tmp_path):
    root = write_folds(tmp_path / "model", folds=(0, 2, 10))
    loaded = load_trained(root)
    assert [config["fold"] for _, config in loaded] == [0, 2, 10]
    assert all(not net.training for net, _ in loaded)
    assert [c["fold"] for _, c in load_trained(root / "fold_2")] == [2]
    assert [c["fold"] for _, c in load_trained(root / "fold_10" / "model.pt")] == [10]
    # folds trained from different seeds are different networks
    weights = [next(net.parameters()).detach() for net, _ in loaded]
    assert not torch.equal(weights[0], weights[1])


def test_a_model_folder_serves_its_all_data_model_and_ensembles_every_fold_when_asked(tmp_path):
    root = write_folds(tmp_path / "model", folds=(1, 0))
    write_model(fold_dir(root, "all"), inference_config(fold="all"), seed=7)
    assert [f.parent.name for f in model_files(root)] == ["fold_all"]
    assert [f.parent.name for f in model_files(root, ensemble=True)] == ["fold_0", "fold_1", "fold_all"]
    assert [c["fold"] for _, c in load_trained(root)] == ["all"]
    assert [c["fold"] for _, c in load_trained(root, ensemble=True)] == [0, 1, "all"]


def test_load_trained_names_what_is_missing_or_cannot_be_ensembled(tmp_path):
    with pytest.raises(StageInputError, match="no trained model"):
        load_trained(tmp_path)
    root = write_folds(tmp_path / "model", folds=(0,))
    write_model(root / "fold_1", inference_config(fold=1, labels={"0": "background", "1": "pancreas"}))
    with pytest.raises(StageInputError, match="labels differ"):
        load_trained(root)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StageInputError, match="junk.pt"):
        load_trained(tmp_path / "junk.pt")


def test_a_pickled_object_in_model_pt_is_refused_not_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    folder = tmp_path / "fold_0"
    folder.mkdir()
    torch.save({"state_dict": Boom(), "config": inference_config()}, folder / MODEL_NAME)
    with pytest.raises(StageInputError, match="not a model written by 'medseg train'"):
        load_trained(folder)


def test_update_config_changes_both_copies_of_the_config(tmp_path):
    folder = write_model(tmp_path / "fold_0", inference_config())
    update_config(folder, largest_component=[2, 3])
    assert json.loads((folder / CONFIG_NAME).read_text())["largest_component"] == [2, 3]
    [(_, config)] = load_trained(folder)
    assert config["largest_component"] == [2, 3]


@pytest.mark.parametrize("value, expected", [(True, [1, 2, 3]), (False, []), ([3], [3]), ([], [])])
def test_largest_component_classes_reads_lists_and_booleans(value, expected):
    assert largest_component_classes({"largest_component": value}, 4) == expected
