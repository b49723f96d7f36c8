"""The MLflow store under concurrency (stages started at once on a fresh store all succeed and lose no run), and
the data version each training run records."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest

from medseg.common.manifest import registered_model_name
from tests.conftest import planned_and_preprocessed
from tests.training.test_train import write_params_yaml


def _at_once(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-m", "medseg.cli", *c], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    return [(p, p.communicate(timeout=600)[0]) for p in procs]


@pytest.mark.slow
def test_two_trainings_and_two_registrations_at_once_on_a_fresh_store(tiny_ingested, params_for, tmp_path):
    shared = {"ingested": str(tiny_ingested)}
    base = planned_and_preprocessed(params_for(paths=shared, train={"max_epochs": 1}))
    files = []
    for k in range(2):
        paths = {**shared, "plans": base.paths.plans, "preprocessed": base.paths.preprocessed,
                 "model": str(tmp_path / f"run{k}" / "model"), "checkpoints": str(tmp_path / f"run{k}" / "ckpt"),
                 "evaluation": str(tmp_path / f"run{k}" / "evaluation"),
                 "registry": str(tmp_path / f"run{k}" / "registry.json")}
        files.append(write_params_yaml(params_for(paths=paths, train={"max_epochs": 1}), tmp_path / f"p{k}.yaml"))
    store = Path(base.mlflow.tracking_uri.removeprefix("sqlite:///"))
    assert not store.exists()
    for proc, output in _at_once([["train", "--params", str(f)] for f in files], tmp_path):
        assert proc.returncode == 0, output
    mlflow.set_tracking_uri(base.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[base.mlflow.experiment], output_format="list")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for f in files:
        proc = subprocess.run([sys.executable, "-m", "medseg.cli", "evaluate", "--params", str(f)], cwd=tmp_path,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    for proc, output in _at_once([["register", "--params", str(f)] for f in files], tmp_path):
        assert proc.returncode == 0, output
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{registered_model_name(base)}'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias(registered_model_name(base), "champion")
    scores = [float(v.tags["heldout_dice_mean"]) for v in versions]
    assert float(champion.tags["heldout_dice_mean"]) == max(scores)  # the one decision was taken in turn


def test_data_version_is_dvcs_hash_while_its_record_describes_the_folder(tmp_path):
    import yaml

    from medseg.common.tracking import data_version, dvc_record

    data = tmp_path / "data" / "preprocessed"
    data.mkdir(parents=True)
    (data / "a.npy").write_bytes(b"12345")
    (data / "b.json").write_text("{}")
    lock = tmp_path / "dvc.lock"
    assert dvc_record(data, lock) is None  # no lock: not run by DVC
    content = data_version(data, None)
    assert content["data_md5_source"] == "content" and len(content["data_md5"]) == 32
    assert data_version(data, None) == content  # deterministic
    out = {"path": str(data), "md5": "f" * 32 + ".dir", "size": 7, "nfiles": 2}
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"preprocess": {"outs": [out]}}}))
    recorded = dvc_record(data, lock)
    assert data_version(data, recorded) == {"data_md5": "f" * 32 + ".dir", "data_md5_source": "dvc.lock"}
    (data / "c.txt").write_text("changed outside DVC")  # the record no longer describes the folder
    changed = data_version(data, recorded)
    assert changed["data_md5_source"] == "content" and changed["data_md5"] != content["data_md5"]
    assert dvc_record(tmp_path / "elsewhere", lock) is None


# Takes the store's lock, says so on stdout, holds it until a line arrives on stdin, then records that it is leaving
# (still holding the lock) before it lets go.
_HOLDER = """
import sys
from medseg.common.tracking import store_lock
with store_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
    with open(sys.argv[2], "a") as log:
        log.write("holder leaves\\n")
"""


def _enter_in_a_thread(uri: str, order: Path, who: str) -> tuple[threading.Event, threading.Event]:
    """``(asking, inside)``: set when a daemon thread starts asking for ``uri``'s store lock, and once it holds it
    (having written ``who`` to ``order`` under the lock)."""
    from medseg.common.tracking import store_lock

    asking, inside = threading.Event(), threading.Event()

    def enter() -> None:
        asking.set()
        with store_lock(uri):
            with order.open("a") as log:
                log.write(f"{who} enters\n")
            inside.set()

    threading.Thread(target=enter, daemon=True).start()
    return asking, inside


def test_store_lock_makes_a_second_process_wait_until_the_first_lets_go(tmp_path):
    """While one process holds a SQLite store's lock, another acquirer of the same store does not get in; it gets in
    once the first lets go, after everything the first did under the lock. Another store's lock is not held up."""
    import select

    from filelock import FileLock, Timeout

    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    order = tmp_path / "order.log"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, uri, str(order)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 120)  # timeouts here are failure guards, not waits
        assert ready and holder.stdout.readline() == "held\n"
        with pytest.raises(Timeout):  # the lock file beside the store is taken, seen without waiting
            FileLock(f"{db}.lock").acquire(timeout=0)
        _, elsewhere = _enter_in_a_thread(f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}", tmp_path / "other.log",
                                          "other store")
        assert elsewhere.wait(60)

        asking, inside = _enter_in_a_thread(uri, order, "second")
        assert asking.wait(60)
        # the window a broken lock would have to let the second in: a correct one never does, however long
        assert not inside.wait(1.0)
        holder.stdin.write("let go\n")
        holder.stdin.flush()
        assert inside.wait(60)
        assert holder.wait(60) == 0
        assert order.read_text().splitlines() == ["holder leaves", "second enters"]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
