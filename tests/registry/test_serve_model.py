"""The registered champion is the whole predictor: a real ``mlflow models serve`` process answers a real HTTP request
carrying a NIfTI volume or a zipped DICOM series with ``medseg predict``'s mask for that file, voxel for voxel; a bad
request gets HTTP 400 with one line and the server stays up."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from medseg.common.manifest import registered_model_name
from medseg.evaluation import evaluate
from medseg.inference import predict
from medseg.registry import register
from medseg.registry.pyfunc_model import file_kind
from tests.conftest import free_port, wait_until_up, write_tiny_volume
from tests.ingest.conftest import axial_positions, write_series

pytestmark = pytest.mark.slow


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def request_for(*files: bytes) -> bytes:
    return json.dumps({"inputs": {"image": [base64.b64encode(f).decode() for f in files]}}).encode()


@pytest.fixture
def served(trained, tmp_path):
    """The champion registered from a tiny training, served by ``mlflow models serve`` on a free port."""
    params, _ = trained
    evaluate.run(params)
    register.run(params)
    uri = f"models:/{registered_model_name(params)}@champion"
    port, log = free_port(), (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path,
                            env={**os.environ, "MLFLOW_TRACKING_URI": params.mlflow.tracking_uri,
                                 "MEDSEG_SERVE_MAX_MB": "1",  # the size limit, small enough to test
                                 # mlflow starts `uvicorn` by name: the environment's own, as in an activated venv
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", proc, tmp_path / "serve.log", seconds=180)
        yield url, uri, params
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()


def test_the_served_champion_segments_files_as_medseg_predict_does(served, tmp_path):
    url, uri, params = served
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    image, _ = write_tiny_volume(7, shape=(44, 38, 5))
    affine = np.array([[0, -1.4, 0, 30.0], [1.6, 0, 0, -12.0], [0, 0, 7.5, 4.0], [0, 0, 0, 1.0]])  # not diagonal
    volume = tmp_path / "inputs" / "scan.nii.gz"
    volume.parent.mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(volume))
    series = tmp_path / "dicom" / "series"
    write_series(series, axial_positions(5), rows=40, cols=36, modality="MR")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        for path in sorted(series.iterdir()):
            archive.write(path, f"PATIENT NAME/{path.name}")  # the zip's folder names are never used
    status, body = post(url, request_for(volume.read_bytes(), zipped.getvalue()))
    assert status == 200, body
    served_volume, served_series = (base64.b64decode(p) for p in body["predictions"])
    assert file_kind(served_volume) == ".nii.gz" and file_kind(served_series) == ".nii.gz"

    expected = predict.run(uri, volume, tmp_path / "by_predict", mlflow_params=params.mlflow)
    (tmp_path / "served.nii.gz").write_bytes(served_volume)
    mine, theirs = nib.load(str(tmp_path / "served.nii.gz")), nib.load(expected["written"][0])
    assert np.array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
    assert np.allclose(mine.affine, affine) and mine.shape == image.shape
    assert np.unique(np.asarray(mine.dataobj)).size > 1  # a real segmentation, not an empty mask

    expected = predict.run(uri, series.parent, tmp_path / "by_predict_dicom", mlflow_params=params.mlflow)
    (tmp_path / "served_series.nii.gz").write_bytes(served_series)
    mine, theirs = nib.load(str(tmp_path / "served_series.nii.gz")), nib.load(expected["written"][0])
    assert np.array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
    assert np.allclose(mine.affine, theirs.affine)


def test_bad_requests_get_one_line_and_the_server_stays_up(served, tmp_path):
    url, _, _ = served
    from PIL import Image

    rgb = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(rgb, format="PNG")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", bytes(3 << 20))  # 3 MB of zeros, a few KB zipped
    bad = {
        "not an image": (request_for(b"hello, this is a note"), "not a NIfTI volume"),
        "not base64": (json.dumps({"inputs": {"image": ["%%% not base64 %%%"]}}).encode(), "not base64"),
        "wrong channels": (request_for(rgb.getvalue()), "channel"),
        "a broken zip": (request_for(b"PK\x03\x04 truncated"), "zip"),
        "no image input": (json.dumps({"inputs": {"scan": ["aGVsbG8="]}}).encode(), "image"),
        "too large": (request_for(b"\x1f\x8b" + os.urandom(2 << 20)), "larger than the 1 MB"),
        "a zip bomb": (request_for(bomb.getvalue()), "unpacks to more than 1 MB"),
    }
    for name, (body, words) in bad.items():
        status, answer = post(url, body)
        assert status == 400, (name, status, answer)
        message = answer.get("message", "")
        assert words in message and "\n" not in message.strip() and "Traceback" not in json.dumps(answer), \
            (name, answer)
    with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:  # still serving
        assert response.status == 200
