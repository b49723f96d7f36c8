"""2D image layouts: images/ + masks/ (Kvasir-SEG, PolypGen), CVC-ClinicDB's Original/ + Ground Truth/, flat folders;
binary and label-indexed masks; groups by file-name pattern or groups.csv; a rejection per bad frame."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from medseg import ingest
from medseg.common.errors import IngestError, StageInputError
from medseg.ingest.images import FRAME_WIDTH, SLICE_THICKNESS, image_to_volume, volume_to_image
from medseg.common.manifest import read_manifest
from medseg.preprocessing.preprocess import make_splits
from tests.ingest.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
GROUP_PATTERN = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["group_pattern"]


def frame(seed: int, size=(40, 30), rgb=True) -> tuple[np.ndarray, np.ndarray]:
    """An RGB (or gray) frame of ``size`` (width, height) with a bright disc, and its 0/255 mask."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(size) / 4) ** 2
    base = rng.integers(20, 90, (height, width, 3) if rgb else (height, width)).astype(np.uint8)
    base[disc] = 200
    return base, (disc * 255).astype(np.uint8)


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def cases_by_source(out: Path, id_map: Path) -> dict[str, dict]:
    sources = json.loads(id_map.read_text())
    return {sources[c.case_id]["source"]: c for c in read_manifest(out).cases}


def test_images_and_masks_pair_by_stem_binarise_jpeg_masks_and_keep_rgb(tmp_path):
    src = tmp_path / "kvasir"
    pixels, mask = frame(0)
    save(src / "images" / "cju0.jpg", pixels)
    save(src / "masks" / "cju0.jpg", mask)  # JPEG: values near 0 and 255, not exactly
    gray, gray_mask = frame(1, rgb=False)
    save(src / "images" / "gray1.png", gray)
    save(src / "masks" / "gray1_mask.png", gray_mask)  # the <stem>_mask form
    out, id_map = tmp_path / "out", tmp_path / "ids.json"
    summary = ingest.ingest_folder(src, out, id_map=id_map)
    assert summary["layout"] == "images" and summary["accepted"] == 2 and summary["labelled"] == 2
    manifest = read_manifest(out)
    assert manifest.labels == {0: "background", 1: "foreground"}
    cases = cases_by_source(out, id_map)
    rgb, one = cases["images/cju0.jpg"], cases["images/gray1.png"]
    assert (rgb.channels, rgb.modality, rgb.shape) == (3, "RGB", (40, 30, 1))
    assert (one.channels, one.modality) == (1, "GRAY")
    assert rgb.spacing == (FRAME_WIDTH / 40, FRAME_WIDTH / 40, SLICE_THICKNESS)  # every frame equally wide

    image = nib.load(str(out / rgb.image))
    assert image.shape == (40, 30, 1, 3) and image.get_data_dtype() == np.uint8
    stored = np.asarray(image.dataobj)
    np.testing.assert_array_equal(volume_to_image(stored), np.asarray(Image.open(src / "images" / "cju0.jpg")))
    label = np.asarray(nib.load(str(out / rgb.label)).dataobj)
    assert set(np.unique(label)) == {0, 1}
    assert np.array_equal(volume_to_image(label), mask > 127) or (volume_to_image(label) != (mask > 127)).mean() < 0.01
    np.testing.assert_array_equal(volume_to_image(np.asarray(nib.load(str(out / one.label)).dataobj)), gray_mask > 127)
    again = ingest.ingest_folder(src, out, id_map=id_map)  # a re-run skips the unchanged frames
    assert again["skipped"] == 2 and again["accepted"] == 2
    assert not [p for p in out.rglob("*") if "medseg-tmp" in p.name]  # nothing half-written left


def test_volume_round_trip_puts_columns_on_x():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)  # 3 rows, 4 columns
    volume = image_to_volume(pixels)
    assert volume.shape == (4, 3, 1) and volume[3, 0, 0] == pixels[0, 3]
    np.testing.assert_array_equal(volume_to_image(volume), pixels)


def test_cvc_clinicdb_layout_reads_tiff_from_original_and_ground_truth(tmp_path):
    src = tmp_path / "CVC-ClinicDB"
    for k in (1, 2):
        pixels, mask = frame(k)
        save(src / "Original" / f"{k}.tif", pixels)
        save(src / "Ground Truth" / f"{k}.tif", mask)
    summary = ingest.ingest_folder(src, tmp_path / "out")
    assert summary["layout"] == "images" and summary["labelled"] == 2


def test_label_indexed_masks_follow_labels_json_and_values_outside_it_are_rejected(tmp_path):
    src = tmp_path / "src"
    (src).mkdir()
    (src / "labels.json").write_text(json.dumps({"0": "background", "1": "polyp", "2": "instrument"}))
    pixels, _ = frame(0)
    good = np.zeros((30, 40), np.uint8)
    good[5:10, 5:10], good[20:25, 20:30] = 1, 2
    save(src / "images" / "a.png", pixels)
    save(src / "masks" / "a.png", good)
    save(src / "images" / "b.png", pixels)
    save(src / "masks" / "b.png", np.full((30, 40), 7, np.uint8))
    palette = Image.fromarray(good).convert("P")  # a palette PNG, as VOC-style label masks are
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # indices 1, 2 shown red, green
    save(src / "images" / "c.png", pixels)
    palette.save(src / "masks" / "c.png")
    assert Image.open(src / "masks" / "c.png").mode == "P"
    out = tmp_path / "out"
    summary = ingest.ingest_folder(src, out)
    assert summary["accepted"] == 2 and summary["rejected"] == 1
    assert read_manifest(out).labels == {0: "background", 1: "polyp", 2: "instrument"}
    for case in read_manifest(out).cases:  # the plain and the palette PNG give the same labels
        stored = volume_to_image(np.asarray(nib.load(str(out / case.label)).dataobj))
        np.testing.assert_array_equal(stored, good)
    report = json.loads((out / "ingest_report.json").read_text())
    assert "label values [7] are not in the label map" in report["rejected"][0]["reason"]


def test_each_bad_frame_is_one_rejection_with_its_reason_and_the_rest_are_ingested(tmp_path):
    src = tmp_path / "src"
    pixels, mask = frame(0)
    save(src / "images" / "ok.png", pixels)
    save(src / "masks" / "ok.png", mask)
    (src / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    save(src / "masks" / "broken.png", mask)
    (src / "images" / "empty.png").write_bytes(b"")
    save(src / "masks" / "empty.png", mask)
    save(src / "images" / "small.png", pixels)
    save(src / "masks" / "small.png", mask[:20, :20])
    save(src / "images" / "unmasked.png", pixels)  # its mask forgotten
    (src / "images" / "badmask.png").write_bytes((src / "images" / "ok.png").read_bytes())
    (src / "masks" / "badmask.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    summary = ingest.ingest_folder(src, out)
    assert summary["accepted"] == 1 and summary["rejected"] == 5
    reasons = sorted(r["reason"] for r in json.loads((out / "ingest_report.json").read_text())["rejected"])
    assert any(r.startswith("cannot read image") for r in reasons), reasons
    assert "image file is empty" in reasons
    assert any("mask size 20x20 differs from the image's 40x30" in r for r in reasons), reasons
    assert any(r.startswith("its mask is missing") for r in reasons), reasons
    assert any(r.startswith("cannot read mask") for r in reasons), reasons
    assert not any("broken" in r or "small" in r or "mask.png" in r or str(src) in r for r in reasons)  # no names


def test_frames_of_one_sequence_share_a_group_and_never_straddle_a_split(tmp_path):
    src = tmp_path / "polypgen"
    names = ["12_endocv2021_positive_148", "12_endocv2021_positive_149", "104OLCV1_100H0002", "104OLCV1_100H0003",
             "104OLCV1_100H0004", "C3_EndoCV2021_00153", "EndoCV2021_C5_0100001", "100H0050"]
    for k, name in enumerate(names):
        pixels, mask = frame(k)
        save(src / "images" / f"{name}.jpg", pixels)
        save(src / "masks" / f"{name}.jpg", mask)
    out, id_map = tmp_path / "out", tmp_path / "ids.json"
    summary = ingest.ingest_folder(src, out, id_map=id_map, group_pattern=GROUP_PATTERN)
    assert summary["accepted"] == 8 and summary["subjects"] == 5  # sequences 12 and 104, three single frames
    cases = cases_by_source(out, id_map)
    subject = {Path(k).stem: c.subject for k, c in cases.items()}
    assert subject["12_endocv2021_positive_148"] == subject["12_endocv2021_positive_149"]
    assert len({subject[n] for n in names[2:5]}) == 1
    assert len({subject[n] for n in names[5:]}) == 3 and subject[names[0]] != subject[names[2]]
    assert not any("12" == c.subject or "104" in c.subject for c in cases.values())  # pseudonyms, not the names
    manifest = read_manifest(out)
    for split in make_splits(list(manifest.cases), 3, seed=0):
        train = {c.subject for c in manifest.cases if c.case_id in split["train"]}
        val = {c.subject for c in manifest.cases if c.case_id in split["val"]}
        assert not train & val

    (src / "groups.csv").write_text("file,group\nC3_EndoCV2021_00153.jpg,patient-7\n100H0050,patient-7\n")
    summary = ingest.ingest_folder(src, tmp_path / "out2", id_map=tmp_path / "ids2.json", group_pattern=GROUP_PATTERN)
    cases = cases_by_source(tmp_path / "out2", tmp_path / "ids2.json")
    assert summary["subjects"] == 4
    assert cases["images/C3_EndoCV2021_00153.jpg"].subject == cases["images/100H0050.jpg"].subject

    summary = ingest.ingest_folder(src, tmp_path / "out3")  # no pattern: every frame without a CSV row is its own group
    assert summary["subjects"] == 7


def test_a_bad_group_pattern_is_one_clear_error(tmp_path):
    pixels, mask = frame(0)
    save(tmp_path / "src" / "images" / "a.png", pixels)
    with pytest.raises(IngestError, match="is not a regular expression"):
        ingest.ingest_folder(tmp_path / "src", tmp_path / "out", group_pattern="(unclosed")


def test_plan_refuses_a_mix_of_rgb_and_gray_frames_in_one_line(tmp_path, params_for):
    from medseg.planning import plan

    src = tmp_path / "src"
    for k, rgb in enumerate((True, False)):
        pixels, mask = frame(k, rgb=rgb)
        save(src / "images" / f"{k}.png", pixels)
        save(src / "masks" / f"{k}.png", mask)
    ingest.ingest_folder(src, tmp_path / "ingested")
    params = params_for(paths={"ingested": str(tmp_path / "ingested")})
    with pytest.raises(StageInputError, match=r"mix \[1, 3\] image channels"):
        plan.run(params)


@pytest.mark.skipif(not (SHARED_DATA / "polyp" / "polypgen").is_dir(), reason="needs ../shared/data/polyp")
def test_real_polypgen_frames_are_all_ingested_in_sequence_groups(tmp_path):
    summary = ingest.ingest_folder(SHARED_DATA / "polyp" / "polypgen", tmp_path / "out", group_pattern=GROUP_PATTERN)
    assert summary["layout"] == "images" and summary["accepted"] == summary["labelled"] == 132
    assert summary["rejected"] == 0 and summary["subjects"] == 130  # sequences 17 and 23 hold two frames each
    cases = read_manifest(tmp_path / "out").cases
    assert all(c.channels == 3 and c.modality == "RGB" for c in cases)
