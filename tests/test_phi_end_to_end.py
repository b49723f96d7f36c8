"""No patient identifier from DICOM headers, and no source folder name or path, reaches any output or log of any
stage, MLflow's store and artifacts included."""

import gzip
from pathlib import Path

import pydicom
import pytest

from medseg import ingest

from medseg.demo import demo_data

from medseg.evaluation import evaluate

from medseg.planning import plan

from medseg.preprocessing import preprocess

from medseg.registry import register

from medseg.training import train

pytestmark = pytest.mark.slow

FOLDER = "DOE_JOHN_MRN12345"
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "ReferringPhysicianName")


def identifiers(dicom_root: Path) -> set[str]:
    values = set()
    for path in dicom_root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in PHI_TAGS:
            value = str(ds.get(tag, "") or "")
            values |= {v for v in [value, *value.split("^")] if len(v) >= 4}
    return values


def every_byte(root: Path) -> bytes:
    chunks = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            chunks.append(gzip.decompress(data) if path.name.endswith(".gz") else data)
    return b"\n".join(chunks)


def test_dicom_identifiers_never_leave_ingestion(params_for, tmp_path, caplog):
    caplog.set_level("DEBUG")
    params = params_for(data={"source": str(tmp_path / "demo" / "pancreas_ct"), "layout": "dicom"},
                        preprocess={"folds": 2}, plan={"target_spacing": [3.0, 3.0, 6.0]}, train={"max_epochs": 1},
                        register={"model_name": "pancreas-phi-check"})
    demo_data.write(tmp_path / "demo", seed=3, cardiac_patients=1, ct_patients=2, polyp_frames=0)
    root = tmp_path / "demo" / "pancreas_ct"  # one series folder named as hospital exports often are
    (root / "dicom" / "series001").rename(root / "dicom" / FOLDER)
    (root / "labels" / "series001.nii.gz").rename(root / "labels" / f"{FOLDER}.nii.gz")
    phi = identifiers(tmp_path / "demo" / "pancreas_ct") | {FOLDER, str(root)}
    assert len(phi) >= 10  # the demo CT carries names, MRNs, birth dates, accession numbers, institutions
    source_bytes = every_byte(tmp_path / "demo" / "pancreas_ct")
    assert all(v.encode() in source_bytes for v in phi - {FOLDER, str(root)})  # the search below does find them where they are

    ingest.ingest_folder(Path(params.data.source), Path(params.paths.ingested), layout="dicom")
    plan.run(params)
    preprocess.run(params)
    train.run(params)
    evaluate.run(params)
    register.run(params)

    written = b"\n".join(every_byte(tmp_path / name) for name in
                         ("ingested", "plans", "preprocessed", "model", "checkpoints", "evaluation", "mlartifacts"))
    written += (tmp_path / "mlflow.db").read_bytes() + (tmp_path / "registry.json").read_bytes()
    written += caplog.text.encode()
    leaked = sorted(v for v in phi if v.encode() in written)
    assert not leaked, f"identifiers found in outputs: {leaked}"
