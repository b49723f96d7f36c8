"""The one Dice and HD95 (``medseg.evaluation.metrics``): the rule for absent classes, and every scorer of medseg agreeing on the
same label maps (training's validation, evaluate's rows, MONAI's own ``compute_dice`` with the same rule)."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.evaluation import metrics


def _maps():
    """A reference with classes 1 and 2, a prediction that misses class 2 and invents class 3; class 4 in neither."""
    truth = np.zeros((12, 10, 3), np.int64)
    pred = np.zeros_like(truth)
    truth[2:8, 2:6] = 1
    pred[3:8, 2:6] = 1
    truth[9:11, 7:9] = 2
    pred[0:2, 0:2, 0] = 3
    return pred, truth


def test_the_rule_for_absent_classes():
    pred, truth = _maps()
    scores = metrics.score_case(pred, truth, {1: "a", 2: "b", 3: "c", 4: "d"}, (1.0, 1.0, 1.0))
    assert scores["a"]["dice"] == pytest.approx(2 * 60 / (60 + 72)) and scores["a"]["hd95"] >= 0.0
    assert scores["b"] == {"dice": 0.0, "hd95": None}  # missed: nothing to measure a distance to
    assert scores["c"] == {"dice": 0.0, "hd95": None}  # invented
    assert scores["d"] == {"dice": 1.0, "hd95": 0.0}   # absent from both: nothing to find, nothing found
    assert list(metrics.dice_per_class(pred, truth, [1, 2, 3, 4])) == [scores[k]["dice"] for k in "abcd"]
    with pytest.raises(ValueError, match="shape"):
        metrics.dice_per_class(pred[:-1], truth, [1])


def test_monai_compute_dice_without_ignore_empty_is_the_same_rule():
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    pred, truth = _maps()

    def hot(a):
        return one_hot(torch.from_numpy(a)[None, None], 5)

    monai = compute_dice(hot(pred), hot(truth), include_background=False, ignore_empty=False)[0].numpy()
    np.testing.assert_allclose(monai, metrics.dice_per_class(pred, truth, [1, 2, 3, 4]), rtol=1e-6)


def test_trainings_validation_scores_with_the_same_dice():
    import torch

    from medseg.training.loop import validate_cases

    pred, truth = _maps()
    logits = torch.from_numpy(np.eye(5, dtype=np.float32)[pred]).permute(3, 0, 1, 2)[None]  # argmax == pred

    class Net(torch.nn.Module):
        def forward(self, x):
            return logits

    loader = [{"image": torch.zeros(1, 1, *pred.shape), "label": torch.from_numpy(truth)[None, None].float()}]
    raw, post = validate_cases(Net(), loader, lambda x, net: net(x), 5, torch.device("cpu"), largest_component=True)
    np.testing.assert_array_equal(raw[0], metrics.dice_per_class(pred, truth, [1, 2, 3, 4]))
    assert raw[0][3] == 1.0 and post.shape == raw.shape
