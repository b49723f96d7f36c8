"""2D images (endoscopy frames and the like): PNG, JPEG, TIFF or BMP, grayscale or RGB, with optional masks.

Layouts (``images``; auto-detected after the volume layouts):

- ``images/`` + ``masks/``, paired by file stem (Kvasir-SEG, PolypGen); a mask named ``<stem>_mask`` is accepted;
- CVC-ClinicDB: ``Original/`` + ``Ground Truth/``;
- a flat folder of images, without masks.

Masks: with a ``labels.json`` in SOURCE (``{"0": "background", "1": "polyp", ...}``) a mask holds label values
(label-indexed PNG) and a value outside the map rejects the frame. Without one a mask is binary: values > 127 are the
object (1), the rest background (0); JPEG masks carry compression noise near 0 and 255. An RGB mask must be gray
(its three channels equal, up to that noise).

Groups: frames of one video sequence (or patient) are near-duplicates and must stay on one side of every split. A
frame's *subject*, the unit splits are drawn by, is its group: the first capture group of ``group_pattern``
(``data.group_pattern``) matched at the start of the file stem, or the ``group`` column of ``SOURCE/groups.csv``
(columns ``file``, ``group``; ``file`` is the image's name or stem), which wins where both apply. A frame without a
group is its own. CVC-ClinicDB's sequences come from its metadata as such a CSV; its file names carry none.

Storage: each frame becomes a NIfTI volume of (columns, rows, 1) pixels, with a trailing channel axis for RGB, and
the label likewise without channels. A frame has no physical scale, but an endoscope's field of view barely changes:
every frame is taken to be :data:`FRAME_WIDTH` units wide (square pixels, aspect kept), so the planner's one target
spacing brings frames of any resolution to one planned size. The single slice is :data:`SLICE_THICKNESS` thick, as
nnU-Net stores 2D data: the planner sees slices far thicker than in-plane and plans a 2D network.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from medseg.ingest.common import CappedReads, CaseRejected, Item, Loaded, Scan, named, read_label_json, rel
from medseg.common.manifest import FRAME_MODALITIES
from medseg.common.pseudonym import pseudonym

__all__ = ["mask_for", "mask_values", "IMAGE_SUFFIXES", "SLICE_THICKNESS", "FRAME_WIDTH", "MASK_THRESHOLD", "frame_affine", "read_frame",
           "mask_pixels", "overlay_pixels", "save_png", "is_image", "GROUPS_CSV", "find_image_pairs", "scan_images",
           "read_image", "frame_group", "image_to_volume", "volume_to_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SLICE_THICKNESS = 999.0  # one slice, "infinitely" thick (nnU-Net's convention for 2D images)
FRAME_WIDTH = 100.0  # every frame's width in the units of its spacing: pixel size = FRAME_WIDTH / columns
MASK_THRESHOLD = 127  # binary masks: > this is the object
GROUPS_CSV = "groups.csv"
# (image folder, mask folder) pairs, tried in order.
FOLDER_PAIRS = (("images", "masks"), ("Original", "Ground Truth"))
MODALITY_RGB, MODALITY_GRAY = FRAME_MODALITIES  # the manifest's modality of a colour / grayscale frame
BINARY_LABELS = {0: "background", 1: "foreground"}  # masks without a labels.json


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_image_pairs(source: Path) -> tuple[list[Path], Path | None]:
    """The image files of an ``images`` layout and its mask folder (None for a flat folder of images)."""
    for images, masks in FOLDER_PAIRS:
        if (source / images).is_dir():
            files = sorted(p for p in (source / images).iterdir() if p.is_file() and is_image(p))
            if files:
                return files, source / masks
    return sorted(p for p in source.iterdir() if p.is_file() and is_image(p)) if source.is_dir() else [], None


def mask_for(image: Path, masks: Path | None) -> Path | None:
    """The mask file of ``image`` in the folder ``masks`` (same stem, or ``<stem>_mask``; any image suffix)."""
    if masks is None or not masks.is_dir():
        return None
    for stem in (image.stem, f"{image.stem}_mask"):
        for candidate in [masks / f"{stem}{image.suffix}", *(masks / f"{stem}{s}" for s in IMAGE_SUFFIXES)]:
            if named(candidate):
                return candidate
    return None


def read_image(path: Path, what: str = "image") -> np.ndarray:
    """(rows, columns) or (rows, columns, 3) uint8-or-wider pixels of an image file; alpha dropped, palette expanded.

    Raises:
        CaseRejected: missing, empty or unreadable file.
    """
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise CaseRejected(f"{what} file is missing: {Path(path).name}")
    if Path(path).stat().st_size == 0:
        raise CaseRejected(f"{what} file is empty")
    try:
        with CappedReads(path) as fh, Image.open(fh) as img:  # a corrupt chunk length cannot allocate past the file
            img.load()
            if what == "mask" and img.mode in ("P", "PA"):  # a label-indexed palette PNG: the indices are the labels
                array = np.asarray(img)
                return array[..., 0] if array.ndim == 3 else array
            if img.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                img = img.convert("RGB" if img.mode not in ("LA",) else "L")
            array = np.asarray(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        # DecompressionBombError: a header claiming more than Pillow's 179 megapixels (a 60000x60000 PNG would
        # need 10.8 GB decoded) is refused before anything is allocated
        raise CaseRejected(f"cannot read {what}: {type(err).__name__}: {err}") from None
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or min(array.shape[:2]) < 1:
        raise CaseRejected(f"{what} of shape {array.shape} is neither grayscale nor RGB")
    return array


def image_to_volume(pixels: np.ndarray) -> np.ndarray:
    """(rows, columns[, 3]) -> (columns, rows, 1[, 3]): NIfTI's x runs along a row, y down the columns."""
    volume = np.swapaxes(pixels, 0, 1)[:, :, None]
    return np.ascontiguousarray(volume)


def volume_to_image(volume: np.ndarray) -> np.ndarray:
    """The inverse of :func:`image_to_volume` (the single slice of a (columns, rows, 1[, C]) array)."""
    return np.ascontiguousarray(np.swapaxes(np.asarray(volume)[:, :, 0], 0, 1))


def mask_values(mask: np.ndarray, labelled: bool) -> np.ndarray:
    """A mask as label values: binarised (> :data:`MASK_THRESHOLD`) unless ``labelled`` (label-indexed)."""
    if mask.ndim == 3:  # an RGB mask: accepted when gray
        spread = int(np.abs(mask.astype(np.int16) - mask[..., :1].astype(np.int16)).max())
        if spread > (0 if labelled else 2 * MASK_THRESHOLD // 8):
            raise CaseRejected(f"mask is a colour image (channels differ by up to {spread}); expected a gray or "
                               "label-indexed mask")
        mask = mask[..., 0]
    if labelled:
        return mask
    return (mask > MASK_THRESHOLD).astype(np.uint8)


def frame_affine(columns: int) -> np.ndarray:
    """The 4x4 affine of a frame ``columns`` pixels wide: square pixels of ``FRAME_WIDTH / columns``."""
    pixel = FRAME_WIDTH / columns
    return np.diag([pixel, pixel, SLICE_THICKNESS, 1.0])


def _kind(pixels: np.ndarray) -> dict:
    return {"channels": 3, "modality": MODALITY_RGB} if pixels.ndim == 3 else {"modality": MODALITY_GRAY}


def pair_loader(image_path: Path, mask_path: Path | None, labelled: bool, expect_mask: bool = False):
    """A ``load()`` for an image file and its optional mask, as :class:`Loaded` volumes on :func:`frame_affine`.
    ``expect_mask``: the layout has a mask folder, so a frame without its mask is rejected (a labelled data set with
    a frame left unlabelled by mistake), not ingested as unlabelled."""

    def load() -> Loaded:
        if mask_path is None and expect_mask:
            raise CaseRejected("its mask is missing (no file of the same stem, or <stem>_mask, in the mask folder)")
        pixels = read_image(image_path, "image")
        image = image_to_volume(pixels)
        if mask_path is None:
            return Loaded(image, frame_affine(image.shape[0]), **_kind(pixels))
        mask = read_image(mask_path, "mask")
        if mask.shape[:2] != pixels.shape[:2]:
            raise CaseRejected(f"mask size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                               f"{pixels.shape[1]}x{pixels.shape[0]} (width x height)")
        label = image_to_volume(mask_values(mask, labelled))
        affine = frame_affine(image.shape[0])
        return Loaded(image, affine, label, affine, **_kind(pixels))

    return load


def _groups_csv(source: Path) -> dict[str, str]:
    """``file`` (name or stem) -> ``group`` from ``SOURCE/groups.csv``; empty without the file."""
    path = source / GROUPS_CSV
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"file", "group"} <= set(rows[0]):
        raise CaseRejected(f"{GROUPS_CSV} needs the columns 'file' and 'group'")
    groups = {}
    for row in rows:
        name, group = (row.get("file") or "").strip(), (row.get("group") or "").strip()
        if name and group:
            groups[name] = groups[Path(name).stem] = group
    return groups


def frame_group(stem: str, pattern: re.Pattern | None, table: dict[str, str], name: str = "") -> str | None:
    """A frame's group: from ``groups.csv`` (by name or stem), else the pattern's first capture group, else None."""
    if name in table or stem in table:
        return table.get(name) or table[stem]
    match = pattern.match(stem) if pattern is not None else None
    return match.group(1) if match and match.groups() and match.group(1) else None


def scan_images(source: Path, skip: tuple[Path, ...] = (), group_pattern: str | None = None) -> Scan:
    """Find the frames of an ``images`` layout (see the module docstring)."""
    images, masks = find_image_pairs(source)
    labels = read_label_json(source / "labels.json") if (source / "labels.json").is_file() else None
    scan = Scan(labels=labels if labels is not None else (dict(BINARY_LABELS) if masks else None))
    try:
        pattern = re.compile(group_pattern) if group_pattern else None
    except re.error as err:
        raise CaseRejected(f"data.group_pattern {group_pattern!r} is not a regular expression: {err}") from None
    table = _groups_csv(source)
    for image in images:
        group = frame_group(image.stem, pattern, table, image.name)
        # The subject (split unit) is the group; a frame without one is its own. Both are keyed pseudonyms.
        subject = pseudonym("group", group) if group else pseudonym("frame", image.stem)
        case_id = pseudonym(subject, image.stem, prefix="img")
        scan.items.append(Item(source=rel(image, source), subject=subject, case_id=case_id,
                               load=pair_loader(image, mask_for(image, masks), labels is not None,
                                                expect_mask=masks is not None and masks.is_dir()),
                               modality=None))
    return scan


def is_images_layout(source: Path) -> bool:
    return bool(find_image_pairs(source)[0])


def read_frame(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int | None]:
    """An image file as ingest stores it: (pixels, volume (columns, rows, 1[, 3]), affine, modality, channels)."""
    pixels = read_image(path, "image")
    volume = image_to_volume(pixels)
    kind = _kind(pixels)
    return pixels, volume, frame_affine(volume.shape[0]), kind["modality"], kind.get("channels")


def mask_pixels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A label volume (columns, rows, 1) as mask pixels at the frame's size: 0 and 255 for a binary task (as the
    data sets' masks are), the label values otherwise."""
    pixels = volume_to_image(labels).astype(np.uint8)
    return pixels * np.uint8(255) if num_classes == 2 else pixels


OVERLAY_COLOURS = np.array([[0, 0, 0], [255, 40, 40], [40, 220, 40], [60, 120, 255], [255, 200, 0], [220, 0, 220]],
                           dtype=np.float32)


def overlay_pixels(pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The frame (RGB, or gray made RGB) with each labelled pixel tinted by its class's colour, half opacity."""
    rgb = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels[..., :3]
    rgb = rgb.astype(np.float32)
    if rgb.max() > 255:  # 16-bit images: shown on 8 bits
        rgb = rgb / rgb.max() * 255
    label = volume_to_image(labels)
    tinted = rgb.copy()
    for value in np.unique(label[label > 0]):
        where = label == value
        tinted[where] = 0.5 * rgb[where] + 0.5 * OVERLAY_COLOURS[int(value) % len(OVERLAY_COLOURS) or 1]
    return tinted.round().astype(np.uint8)


def save_png(path: Path, pixels: np.ndarray, compress_level: int = 6) -> Path:
    """Write ``pixels`` as a PNG, atomically (nothing half-written is ever left under the final name).
    ``compress_level`` 1 writes an RGB frame about 4x faster than PIL's default 6, 25% larger (for overlays)."""
    from PIL import Image

    from medseg.common.atomic_write import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=compress_level)
    return Path(path)
