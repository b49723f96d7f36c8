import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from medseg.training import loaders, loop, resume, train
from medseg.inference.model_folder import CONFIG_NAME, HISTORY_NAME, MODEL_NAME, RUN_NAME
from medseg.evaluation.postprocessing import decide_postprocessing
from medseg.training.resume import CHECKPOINT_NAME
from tests.conftest import planned_and_preprocessed


def checkpoint(params, fold=0) -> dict:
    return torch.load(Path(params.paths.checkpoints) / f"fold_{fold}" / CHECKPOINT_NAME, weights_only=True)


def optimizer_steps(ckpt: dict) -> int:
    return int(ckpt["optimizer"]["state"][0]["step"])


def write_params_yaml(params, path: Path) -> Path:
    """``params`` as a params.yaml a ``medseg`` subprocess can load (tuples as lists)."""
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(params)))))
    return path


def medseg(*args: str, cwd: Path) -> subprocess.Popen:
    # The same number of intra-op threads as this process: weights compared bit for bit with a training run here
    # must not differ by the order of floating-point sums.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return subprocess.Popen([sys.executable, "-m", "medseg.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_train_writes_fold_model_checkpoint_and_mlflow_run(trained):
    params, summary = trained
    fold_dir = Path(params.paths.model) / "fold_0"
    assert sorted(p.name for p in Path(params.paths.model).iterdir()) == ["fold_0", "postprocessing.json"]
    for name in (MODEL_NAME, CONFIG_NAME, RUN_NAME, HISTORY_NAME):
        assert (fold_dir / name).is_file()
    ckpt = checkpoint(params)
    (fold,) = summary["folds"]
    assert fold["epochs"] == 2 == ckpt["state"]["epoch"] and fold["fold"] == 0
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    run = mlflow.get_run(fold["run_id"])
    assert run.info.run_name == "unet-fold0" and run.data.tags["fold"] == "0" and run.data.tags["cv_group"]
    assert run.data.params["model.name"] == "unet"
    assert run.data.tags["data_md5"] and run.data.tags["git_commit"]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(fold["run_id"], "train_loss")] == [1, 2]
    waits = [m.value for m in client.get_metric_history(fold["run_id"], "data_wait_fraction")]
    assert len(waits) == 2 and all(0 < w < 1 for w in waits)
    assert "val_dice" in run.data.metrics
    with (fold_dir / HISTORY_NAME).open() as fh:
        history = list(csv.DictReader(fh))
    assert [float(r["data_wait_fraction"]) for r in history] == pytest.approx(waits)

    plan = json.loads((Path(params.paths.plans) / "plans.json").read_text())
    config = json.loads((fold_dir / CONFIG_NAME).read_text())
    assert set(config) == {"network", "in_channels", "out_channels", "labels", "modality", "target_spacing",
                           "normalization", "patch_size", "tta", "sw_overlap", "sw_batch_size", "largest_component",
                           "fold"}
    assert (config["sw_overlap"], config["sw_batch_size"]) == (params.evaluate.sw_overlap,
                                                               params.evaluate.sw_batch_size)
    assert config["network"] == plan["network"] and config["patch_size"] == plan["patch_size"]
    assert config["normalization"] == plan["normalization"] and config["target_spacing"] == plan["target_spacing"]
    assert config["out_channels"] == 4 and config["labels"]["3"] == "LV" and config["modality"] == "MR"
    assert config["tta"] is params.evaluate.tta
    decision = json.loads((Path(params.paths.model) / "postprocessing.json").read_text())
    assert config["largest_component"] == decision["largest_component"] == summary["postprocessing"]["largest_component"]
    assert decision["cases"] == 2 and set(decision["dice_with"]) == {"RV", "myocardium", "LV"}
    saved = torch.load(fold_dir / MODEL_NAME, weights_only=True)
    assert saved["config"] == config
    run_json = json.loads((fold_dir / RUN_NAME).read_text())
    assert run_json["run_id"] == fold["run_id"] and run_json["model_uri"].startswith("models:/")


def test_fold_all_trains_each_fold_into_its_own_run_with_sgd(tiny_ingested, params_for):
    params = planned_and_preprocessed(params_for(
        paths={"ingested": str(tiny_ingested)}, preprocess={"folds": 2}, plan={"patch_size": [32, 32, 1]},
        train={"fold": "all", "max_epochs": 1, "steps_per_epoch": 1, "optimizer": "sgd"}))
    summary = train.run(params)
    folds = params.preprocess.folds
    assert [f["fold"] for f in summary["folds"]] == list(range(folds))
    assert sorted(p.name for p in Path(params.paths.model).iterdir()) == [f"fold_{k}" for k in range(folds)] + [
        "postprocessing.json"]
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    runs = [mlflow.get_run(f["run_id"]) for f in summary["folds"]]
    assert len({r.info.run_id for r in runs}) == folds
    assert [r.info.run_name for r in runs] == [f"unet-fold{k}" for k in range(folds)]
    assert [r.data.tags["fold"] for r in runs] == [str(k) for k in range(folds)]
    assert len({r.data.tags["cv_group"] for r in runs}) == 1
    for k in range(folds):
        config = json.loads((Path(params.paths.model) / f"fold_{k}" / CONFIG_NAME).read_text())
        assert config["fold"] == k
        group = checkpoint(params, k)["optimizer"]["param_groups"][0]
        assert group["nesterov"] is True and group["momentum"] == 0.99
    held_out = [c["case_id"] for k in range(folds) for c in loaders.data_lists(params, k)[1]]
    assert len(held_out) == len(set(held_out)) == 6  # every case validated exactly once across the folds


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_into_same_run_with_identical_weights(tiny_ingested, params_for, tmp_path):
    """A real SIGKILL during the second epoch; ``--resume`` must end exactly where an uninterrupted run ends."""
    shared = {"ingested": str(tiny_ingested)}
    small = {"patch_size": [32, 32, 1], "batch_size": 2}
    settings = {"max_epochs": 3, "steps_per_epoch": 40, "device": "cpu"}
    reference = planned_and_preprocessed(params_for(paths=shared, plan=small, train=settings))
    killed_paths = {**shared, "plans": reference.paths.plans, "preprocessed": reference.paths.preprocessed,
                    "model": str(tmp_path / "killed" / "model"),
                    "checkpoints": str(tmp_path / "killed" / "checkpoints")}
    # Same store, own experiment: "one run" below counts the killed-and-resumed training alone.
    killed = params_for(paths=killed_paths, plan=small, train=settings, mlflow={"experiment": "killed"})
    params_file = write_params_yaml(killed, tmp_path / "killed.yaml")
    ckpt_file = Path(killed.paths.checkpoints) / "fold_0" / CHECKPOINT_NAME

    proc = medseg("train", "--params", str(params_file), cwd=tmp_path)
    seen = []
    try:
        # The epoch's log line comes after its checkpoint and its MLflow metrics, just before the next epoch starts.
        for line in proc.stdout:
            seen.append(line)
            if "fold_0 epoch 1/3" in line:
                break
        assert ckpt_file.exists(), "".join(seen)
        time.sleep(0.2)  # a few steps into epoch 2 (logging the final model alone takes longer than this)
        proc.send_signal(signal.SIGKILL)
        output = "".join(seen) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, output
    before = torch.load(ckpt_file, weights_only=True)
    assert 1 <= before["state"]["epoch"] < settings["max_epochs"]
    assert not Path(killed.paths.model).exists(), "a killed training must not leave a model folder behind"

    resumed = medseg("train", "--params", str(params_file), "--resume", cwd=tmp_path)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming from" in output, output[-3000:]

    expected = train.run(reference)["folds"][0]  # uninterrupted, same params, in this process
    after, uninterrupted = checkpoint(killed), checkpoint(reference)
    run_id = before["state"]["run_id"]
    assert after["state"]["run_id"] == run_id
    assert json.loads((Path(killed.paths.model) / "fold_0" / RUN_NAME).read_text())["run_id"] == run_id
    assert optimizer_steps(after) == optimizer_steps(uninterrupted) == 3 * settings["steps_per_epoch"]
    for name, weight in uninterrupted["model"].items():
        assert torch.equal(after["model"][name], weight), name
    best_killed = torch.load(Path(killed.paths.model) / "fold_0" / MODEL_NAME, weights_only=True)["state_dict"]
    best_reference = torch.load(Path(reference.paths.model) / "fold_0" / MODEL_NAME, weights_only=True)
    assert all(torch.equal(best_killed[k], v) for k, v in best_reference["state_dict"].items())
    assert round(after["state"]["best_dice"], 4) == expected["best_val_dice"]

    client = mlflow.MlflowClient(tracking_uri=killed.mlflow.tracking_uri)
    assert len(client.search_runs([client.get_experiment_by_name(killed.mlflow.experiment).experiment_id])) == 1
    for metric in ("train_loss", "lr", "data_wait_fraction", "val_dice"):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2, 3], metric
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_ignores_checkpoint_from_other_params(tiny_ingested, params_for):
    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 1}))
    first = train.run(params)["folds"][0]
    changed = params_for(paths={"ingested": str(tiny_ingested)},
                         train={"max_epochs": 1, "learning_rate": params.train.learning_rate * 2})
    second = train.run(changed, resume=True)["folds"][0]
    assert second["run_id"] != first["run_id"]


def test_a_post_processing_edit_revalidates_a_finished_fold_and_a_training_edit_retrains(tiny_ingested, params_for,
                                                                                         monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="medseg.training.train")
    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 2}))
    first = train.run(params)["folds"][0]
    weights = (Path(params.paths.model) / "fold_0" / MODEL_NAME).read_bytes()

    monkeypatch.setattr(resume, "postprocess_code", lambda: "edited post-processing")
    caplog.clear()
    again = train.run(params, resume=True)["folds"][0]
    assert again["run_id"] == first["run_id"] and again["epochs"] == 2
    assert "resuming from" in caplog.text and "validated again" in caplog.text and "starting afresh" not in caplog.text
    assert (Path(params.paths.model) / "fold_0" / MODEL_NAME).read_bytes() == weights  # not retrained
    assert checkpoint(params)["state"]["final_val"]["postprocess_code"] == "edited post-processing"

    monkeypatch.setattr(resume, "training_code", lambda: ["medseg/registry/register.py"])  # other code shaping the weights
    caplog.clear()
    retrained = train.run(params, resume=True)["folds"][0]
    assert "starting afresh" in caplog.text and retrained["run_id"] != first["run_id"]


class _Payload:
    """Unpickling this runs ``touch``: what a planted checkpoint could do if it were loaded with full pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_runs_code_from_a_planted_checkpoint(tiny_ingested, params_for, tmp_path, caplog):
    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 1}))
    ckpt = Path(params.paths.checkpoints) / "fold_0" / CHECKPOINT_NAME
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, ckpt)
    summary = train.run(params, resume=True)["folds"][0]
    assert not marker.exists()
    assert "cannot be loaded safely" in caplog.text and summary["epochs"] == 1
    torch.load(ckpt, weights_only=True)  # the checkpoint written since loads without pickle


def test_data_wait_fraction_measures_time_blocked_on_the_loader():
    """A loader that sleeps far longer than the step computes: most of the epoch is waiting for data."""
    from monai.losses import DiceCELoss

    net = torch.nn.Conv2d(1, 3, 3, padding=1)

    def slow_loader(n=3):
        for _ in range(n):
            time.sleep(0.2)
            image = torch.randn(2, 1, 16, 16)
            yield {"image": image, "label": (image > 0).long()}

    optimizer = torch.optim.AdamW(net.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = loop.train_epoch(net, slow_loader(), optimizer, scaler, DiceCELoss(to_onehot_y=True, softmax=True),
                              torch.device("cpu"))
    assert stats["steps"] == 3 and stats["loss"] > 0
    assert 0.5 < stats["data_wait_fraction"] < 1


def test_train_amp_is_for_cuda_and_train_cpu_amp_for_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert loop.amp_settings("fp16", cpu) == (None, False) and loop.amp_settings("bf16", cpu, "off") == (None, False)
    assert loop.amp_settings("off", cpu, "bf16") == (torch.bfloat16, False)  # no loss scaling for bf16
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert loop.amp_settings("fp16", cpu, "auto") == (None, False)  # emulated bf16 would be slower
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.amp_settings("fp16", cpu, "auto") == (torch.bfloat16, False)


def test_a_bf16_training_step_on_the_cpu_learns():
    """The autocast path train_epoch takes with train.cpu_amp: bf16 (float32 weights, no scaler)."""
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    image = torch.randn(4, 1, 16, 16)
    batches = [{"image": image, "label": (image > 0).long()}] * 8
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    first = loop.train_epoch(net, batches[:1], optimizer, scaler, loss_fn, torch.device("cpu"), torch.bfloat16)
    for _ in range(5):
        last = loop.train_epoch(net, batches, optimizer, scaler, loss_fn, torch.device("cpu"), torch.bfloat16)
    assert last["loss"] < 0.8 * first["loss"] and next(net.parameters()).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp, dtype, scaled", [("fp16", torch.float16, True), ("bf16", torch.bfloat16, False)])
def test_mixed_precision_epoch_on_cuda(amp, dtype, scaled):
    from medseg.networks.architectures import build_loss, build_network

    device = torch.device("cuda")
    assert loop.amp_settings(amp, device) == (dtype, scaled)
    spec = {"name": "unet", "spatial_dims": 2, "channels": [8, 16, 32], "strides": [2, 2], "kernel_sizes": None,
            "num_res_units": 0, "norm": "instance", "dropout": 0.0, "deep_supervision": False}
    net = build_network(spec, 1, 3).to(device)
    optimizer = torch.optim.AdamW(net.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=scaled)
    image = torch.randn(4, 1, 64, 64)
    batches = [{"image": image, "label": (image > 0).long() + (image > 1).long()}] * 3
    stats = loop.train_epoch(net, batches, optimizer, scaler, build_loss(spec), device, dtype)
    assert stats["steps"] == 3 and torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_network_trains_and_saves_plain_weights(tiny_ingested, params_for):
    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 train={"compile": True, "max_epochs": 1, "device": "cuda"}))
    train.run(params)
    saved = torch.load(Path(params.paths.model) / "fold_0" / MODEL_NAME, weights_only=True)["state_dict"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in saved)


def test_final_model_trains_on_every_case_after_the_folds_and_serves(tiny_ingested, params_for):
    params = planned_and_preprocessed(params_for(
        paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 1, "final_model": True},
        evaluate={"largest_component": True}))
    summary = train.run(params)
    assert [f["fold"] for f in summary["folds"]] == [0, "all"]
    final = summary["folds"][1]
    assert final["final_val_dice"] is None and final["epochs"] == 1  # nothing held out to validate on
    train_files, val_files, _ = loaders.data_lists(params, "all")
    assert len(train_files) == 6 and val_files == []
    config = json.loads((Path(params.paths.model) / "fold_all" / CONFIG_NAME).read_text())
    assert config["fold"] == "all" and config["largest_component"] == [1, 2, 3]
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    assert mlflow.get_run(final["run_id"]).data.tags["fold"] == "all"


def test_time_budget_stops_training_and_decays_the_rate_with_the_clock(tiny_ingested, params_for):
    """Stopped by the budget, not by max_epochs; the rate falls with the share of the budget spent. (Loose on
    purpose: the machine's load decides how many epochs fit; the arithmetic is tested exactly below.)"""
    params = planned_and_preprocessed(params_for(
        paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 100000, "time_budget_minutes": 0.1,
                                                       "steps_per_epoch": 1, "val_interval": 100000}))
    fold = train.run(params)["folds"][0]
    assert 1 <= fold["epochs"] < 100000
    ckpt = checkpoint(params)
    assert ckpt["state"]["epochs"] == fold["epochs"] and ckpt["state"]["elapsed_s"] > 0
    with (Path(params.paths.model) / "fold_0" / HISTORY_NAME).open() as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh)]
    assert len(lrs) == fold["epochs"] and lrs[0] == params.train.learning_rate
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # each epoch's rate is the schedule at the share of the budget spent before it
    assert lrs[-1] < lrs[0] or len(lrs) == 1


@pytest.mark.parametrize("elapsed, done, val_s, expected", [
    (10.0, 1, 0.0, 60),     # 10 s an epoch, 600 s: 60 epochs
    (10.0, 1, 5.0, 59),     # room kept for the last validation when validations are sparse
    (100.0, 4, 0.0, 24),    # 25 s an epoch
    (700.0, 10, 0.0, 10),   # over budget: stop now, never fewer than done
    (1.0, 1, 0.0, 200),     # capped by max_epochs
])
def test_fit_epochs(elapsed, done, val_s, expected):
    assert loop.fit_epochs(600.0, elapsed, done, 200, val_s, val_interval=10) == expected


def test_poly_lr_is_nnunets_schedule_over_epochs_or_over_the_budget():
    assert loop.poly_lr(0.01, loop.training_progress(0, 100)) == 0.01
    assert loop.poly_lr(0.01, loop.training_progress(50, 100)) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert loop.poly_lr(0.01, loop.training_progress(100, 100)) == 0.0
    # with a budget: the share of it spent, unless max_epochs is nearer
    assert loop.training_progress(10, 1000, elapsed_s=150.0, budget_s=600.0) == 0.25
    assert loop.training_progress(900, 1000, elapsed_s=150.0, budget_s=600.0) == 0.9
    assert loop.training_progress(10, 1000, elapsed_s=700.0, budget_s=600.0) == 1.0


def test_postprocessing_is_kept_only_for_classes_it_improves():
    labels = {0: "background", 1: "RV", 2: "myocardium", 3: "LV"}
    raw = np.array([[0.5, 0.8, 0.9], [0.7, 0.8, np.nan]])
    post = np.array([[0.6, 0.7, 0.9], [0.7, 0.8, np.nan]])
    decision = decide_postprocessing(raw, post, labels)
    assert decision["largest_component"] == [1]  # RV improves; myocardium gets worse; LV unchanged
    assert decision["dice_without"]["RV"] == 0.6 and decision["dice_with"]["RV"] == 0.65 and decision["cases"] == 2


def test_training_inputs_change_with_data_params_and_code_but_not_with_the_rerun_cache(tiny_ingested, params_for,
                                                                                        monkeypatch):
    params = params_for(paths={"ingested": str(tiny_ingested)})
    base = resume.training_inputs(params)
    assert resume.training_inputs(params) == base
    (tiny_ingested / ".ingest_cache.json").write_text("{}")  # file times, not content: no effect
    assert resume.training_inputs(params) == base
    moved = params_for(paths={"ingested": str(tiny_ingested)}, data={"source": "/elsewhere"})
    assert resume.training_inputs(moved) == base  # where the data lives does not matter, its content does
    assert resume.training_inputs(params_for(paths={"ingested": str(tiny_ingested)},
                                            train={"learning_rate": 0.02})) != base
    label = sorted((tiny_ingested / "labels").iterdir())[0]
    label.write_bytes(label.read_bytes() + b"\0")
    assert resume.training_inputs(params) != base
    changed = resume.training_inputs(params)
    monkeypatch.setattr(resume, "TRAINING_MODULE", "medseg.registry.register")  # other code
    assert resume.training_inputs(params) != changed


def test_the_epoch_progress_bar_is_off_when_the_output_is_not_a_terminal(capsys):
    """Logs and CI output stay clean; a terminal gets the bar (tqdm decides by isatty)."""
    import types

    from medseg.training.loop import epoch_progress

    state = {"epoch": 0, "epochs": 3, "elapsed_s": 30.0}
    with epoch_progress("fold_0", state, 1.0, types.SimpleNamespace(is_main=True)) as after:
        for epoch in range(3):
            state["epoch"] = epoch + 1
            after({"train_loss": 0.5, "val_dice": 0.7})
    assert capsys.readouterr().err == ""
