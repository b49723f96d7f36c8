"""``medseg train`` under ``torchrun``, two CPU processes (gloo): one run, one checkpoint, one model, equal weights."""

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from medseg.training.distributed import DistContext, all_gather, broadcast, mean_over_ranks, weights_digest
from medseg.inference.model_folder import CONFIG_NAME, HISTORY_NAME, MODEL_NAME, RUN_NAME
from medseg.training.resume import CHECKPOINT_NAME
from tests.conftest import planned_and_preprocessed

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def test_single_process_collectives_are_identities(monkeypatch):
    from medseg.training.distributed import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed("cpu") as ctx:
        assert ctx == DistContext(0, 1, 0, torch.device("cpu")) and ctx.is_main and not ctx.enabled
        assert all_gather({"a": 1}, ctx) == [{"a": 1}] and broadcast(3, ctx) == 3 and mean_over_ranks(2.5, ctx) == 2.5


def test_bad_torchrun_environment_is_named(monkeypatch):
    from medseg.training.distributed import distributed

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE"), distributed("cpu"):
        pass


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_torchrun_two_cpu_ranks_train_one_model(tiny_ingested, params_for, tmp_path):
    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 plan={"patch_size": [32, 32, 1], "batch_size": 2},
                                                 train={"max_epochs": 2, "steps_per_epoch": 2, "device": "cpu"}))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(params)))))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "medseg.cli", "-v", "train",
                             "--params", str(params_file)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    digests = dict(re.findall(r"rank (\d) fold 0 final weights sha256 ([0-9a-f]{64})", output))
    assert sorted(digests) == ["0", "1"], output[-4000:]
    assert digests["0"] == digests["1"], "the two ranks ended with different weights"
    ckpt = torch.load(Path(params.paths.checkpoints) / "fold_0" / CHECKPOINT_NAME, weights_only=True)
    assert weights_digest(ckpt["model"]) == digests["0"]
    # Both ranks' random states are in the one checkpoint, and they differ: each rank drew its own patches.
    assert len(ckpt["ranks"]) == 2
    assert pickle.dumps(ckpt["ranks"][0]["loader"]) != pickle.dumps(ckpt["ranks"][1]["loader"])
    assert optimizer_steps(ckpt) == 2 * 2  # per rank: max_epochs x steps_per_epoch (gradients averaged, not summed)

    checkpoints = sorted(p.relative_to(params.paths.checkpoints) for p in Path(params.paths.checkpoints).rglob("*")
                         if p.is_file())
    assert checkpoints == [Path("fold_0") / CHECKPOINT_NAME]
    model_dir = Path(params.paths.model)
    assert sorted(p.name for p in model_dir.iterdir()) == ["fold_0", "postprocessing.json"]
    assert sorted(p.name for p in (model_dir / "fold_0").iterdir()) == sorted(
        [MODEL_NAME, CONFIG_NAME, RUN_NAME, HISTORY_NAME])
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(f".{model_dir.name}")]
    assert output.count("model written to") == 1
    assert result.stdout.count('"folds"') == 1  # one summary printed, by rank 0

    client = mlflow.MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(params.mlflow.experiment).experiment_id])
    assert run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    run_json = json.loads((model_dir / "fold_0" / RUN_NAME).read_text())
    assert run_json["run_id"] == run.info.run_id


def optimizer_steps(ckpt: dict) -> int:
    return int(ckpt["optimizer"]["state"][0]["step"])
