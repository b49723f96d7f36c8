"""Disk-full campaign: every stage of the pipeline runs out of space at a random point of its writing, on a real
small file system (a tmpfs mounted for the run: needs root, or CAP_SYS_ADMIN; ``available()`` says).

    sudo .venv/bin/python reliability/disk_full.py --seed 0 --passes 5

One pass runs the demo project's stages in order (``medseg demo-data`` .. ``register``, the real CLI in
subprocesses, the project and its MLflow store on the tmpfs). Before each stage the file system is shrunk to what it
holds plus a random share of what that stage writes (measured in a first, unhindered run), so the stage meets
ENOSPC (``OSError``, or SQLite's "database or disk is full") somewhere in its writes. Then the rules:

- the stage exits with code 2 and says so in one line on stderr (``medseg <stage>: error: ...``), no traceback;
- nothing half-written: no temporary (``.medseg-tmp-``) left, and every output the stage had made before is intact
  (the previous outputs' hashes are unchanged, or the stage's output folder is absent when it had none);
- given the space back, the same command completes (exit 0), and the pass goes on.

A stage that happens to fit (its random share was enough) counts as "fitted", not as a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["demo-data", "ingest", "plan", "preprocess", "train", "evaluate", "register"]
TMP_MARKER = ".medseg-tmp-"
# A small demo and a few seconds of training: each stage writes a few MB at most
DEMO = {"cardiac_patients": 6, "ct_patients": 1, "polyp_frames": 3}
TRAIN = {"time_budget_minutes": None, "max_epochs": 2, "steps_per_epoch": 2, "val_interval": 1,
         "final_model": True, "fold": 0}


def available() -> str | None:
    """None when a tmpfs can be mounted here, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = Path(tempfile.mkdtemp(prefix="medseg-tmpfs-probe-"))
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            return f"cannot mount a tmpfs: {done.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


def _resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={max(size, 65536)}", str(mount)], check=True,
                   capture_output=True)


def _used(mount: Path) -> int:
    stat = os.statvfs(mount)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "mlflow.db" not in p.name}


def _project(folder: Path) -> Path:
    """The demo project in ``folder``: params.yaml with small counts (no git, no DVC: the stages' CLI itself)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["demo"].update(DEMO)
    raw["train"].update(TRAIN)
    raw["plan"].update(memory_budget_mb=50)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder / "params.yaml"


def _run(stage: str, project: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    return subprocess.run([sys.executable, "-m", "medseg.cli", stage, "--params", "params.yaml"], cwd=project,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(f"*{TMP_MARKER}*")]


def measure(project: Path, mount: Path) -> dict[str, int]:
    """Bytes each stage adds to the file system, unhindered."""
    grown = {}
    for stage in STAGES:
        before = _used(mount)
        done = _run(stage, project)
        if done.returncode != 0:
            raise RuntimeError(f"{stage} failed with space to spare:\n{done.stderr[-3000:]}")
        grown[stage] = _used(mount) - before
    return grown


def one_pass(seed: int, grown: dict[str, int], mount: Path, big: int) -> list[dict]:
    """Each stage run short of space, checked, then rerun with space."""
    rng = random.Random(seed)
    project = mount / f"pass-{seed}"
    project.mkdir()
    _project(project)
    results = []
    for stage in STAGES:
        share = rng.uniform(0.05, 0.95)
        before = _digest(project)
        _resize(mount, _used(mount) + int(share * grown[stage]))
        short = _run(stage, project)
        _resize(mount, big)
        lines = [line for line in short.stderr.strip().splitlines() if line.startswith(f"medseg {stage}: error:")]
        result = {"seed": seed, "stage": stage, "share": round(share, 3), "exit": short.returncode,
                  "said": (lines or short.stderr.strip().splitlines() or [""])[-1]}
        problems = []
        if short.returncode == 0:
            result["fitted"] = True
        else:
            if short.returncode != 2 or not lines:
                problems.append(f"exit {short.returncode} without one error line")
            if "Traceback" in short.stderr:
                problems.append("a traceback on stderr")
            if "space" not in " ".join(lines).lower() and "full" not in " ".join(lines).lower():
                problems.append("the error does not say the disk is full")
            if left := _leftovers(project):
                problems.append(f"temporaries left: {left[:3]}")
            after = _digest(project)
            changed = [k for k in before if after.get(k) not in (None, before[k]) and "mlartifacts" not in k]
            if changed:
                problems.append(f"earlier outputs changed: {changed[:3]}")
        again = _run(stage, project)
        if again.returncode != 0:
            problems.append(f"the rerun with space failed: {again.stderr.strip().splitlines()[-1:]}")
        if left := _leftovers(project):
            problems.append(f"temporaries left after the rerun: {left[:3]}")
        result["problems"] = problems
        if problems:
            result["stderr"] = short.stderr[-4000:]
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "stderr"}), file=sys.stderr)
    shutil.rmtree(project)
    return results


def campaign(seed: int, passes: int, mib: int = 1024) -> dict:
    why = available()
    if why:
        raise SystemExit(f"disk-full campaign: {why}")
    mount = Path(tempfile.mkdtemp(prefix="medseg-diskfull-"))
    big = mib * 2**20
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={big}", "tmpfs", str(mount)], check=True)
    started = time.monotonic()
    try:
        reference = mount / "reference"
        reference.mkdir()
        _project(reference)
        grown = measure(reference, mount)
        shutil.rmtree(reference)
        results = [r for k in range(passes) for r in one_pass(seed + k, grown, mount, big)]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()
    failures = [r for r in results if r["problems"]]
    return {"seed": seed, "passes": passes, "stage_runs": len(results),
            "ran_out": sum(1 for r in results if not r.get("fitted")),
            "fitted": sum(1 for r in results if r.get("fitted")), "failures": failures,
            "bytes_per_stage": grown, "seconds": round(time.monotonic() - started, 1),
            "said": sorted({r["said"] for r in results if not r.get("fitted")})}


def main(argv: list[str] | None = None) -> int:
    if str(REPO) not in sys.path:  # run as a script: the repository's reliability package
        sys.path.insert(0, str(REPO))
    from reliability.report import finish

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    summary = campaign(args.seed, args.passes)
    return finish(summary, args.out, lambda f: f"stage {f['stage']} at {f['share']:.0%} of its writes: "
                                               f"{f['problems']}")


if __name__ == "__main__":
    sys.exit(main())
