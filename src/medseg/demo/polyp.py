"""Synthetic colonoscopy frames with polyp masks, in the Kvasir-SEG / PolypGen layout (``images/`` + ``masks/``).

A smoke test for the 2D image path (``data.source: data/demo/polyp``), not a stand-in for real frames. Each video
sequence draws a frame size (4:3 or 16:9), a mucosa colour and texture (smooth noise and a few dark vessels), and
one polyp (a lobed ellipse, redder and brighter than the wall, with a soft rim and specular highlights); its frames
move and scale the polyp a little, as neighbouring frames of a video do. Every frame gets the dark vignette of an
endoscope's optics and sensor noise. Names ``<sequence>_frame<k>.png`` carry the sequence as ``data.group_pattern``
reads it, so splits keep a sequence's frames together. Masks are 0 and 255. The same seed gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["write_polyp_dataset"]

SIZES = ((320, 240), (384, 288), (352, 198))  # (width, height): 4:3 and 16:9 frames of modest size
FRAMES_PER_SEQUENCE = 3


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.normal(size=shape), sigma)
    return field / (np.abs(field).max() + 1e-9)


def _polyp_mask(yy, xx, centre, radii, theta, lobes) -> np.ndarray:
    """Signed "radius fraction" of a lobed ellipse: < 1 inside."""
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    phi = np.arctan2(v, u)
    radius = 1.0 + sum(a * np.cos((k + 2) * phi + p) for k, (a, p) in enumerate(lobes))
    return np.sqrt((u / radii[1]) ** 2 + (v / radii[0]) ** 2) / radius


def _frame(rng: np.random.Generator, seq: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    width, height = seq["size"]
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    texture = _smooth_noise(rng, (height, width), 6.0) * 0.12 + _smooth_noise(rng, (height, width), 1.5) * 0.04
    wall = np.asarray(seq["mucosa"], np.float32)[None, None, :] * (1.0 + texture[..., None])
    for vessel in seq["vessels"]:  # thin dark curves
        a, b, c, w = vessel
        dist = np.abs(yy - (a * (xx / width - 0.5) ** 2 * height + b * height + c * xx)) / w
        wall *= (1.0 - 0.25 * np.exp(-dist ** 2))[..., None]
    drift = np.array(seq["drift"]) * k
    centre = (seq["centre"][0] * height + drift[0], seq["centre"][1] * width + drift[1])
    scale = 1.0 + 0.06 * k
    radii = (seq["radii"][0] * height * scale, seq["radii"][1] * height * scale)
    r = _polyp_mask(yy, xx, centre, radii, seq["theta"], seq["lobes"])
    inside = np.clip((1.08 - r) / 0.16, 0.0, 1.0)  # soft rim
    polyp = np.asarray(seq["polyp"], np.float32)[None, None, :] * (1.0 + 0.5 * texture[..., None])
    image = wall * (1.0 - inside[..., None]) + polyp * inside[..., None]
    for _ in range(3):  # specular highlights on the polyp's surface
        hy, hx = centre[0] + rng.normal(0, radii[0] / 3), centre[1] + rng.normal(0, radii[1] / 3)
        image += 160.0 * np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * rng.uniform(1.5, 4.0) ** 2))[..., None]
    vignette = 1.0 - 0.75 * np.clip(np.hypot((yy - height / 2) / (0.62 * height), (xx - width / 2) /
                                            (0.62 * width)) - 0.35, 0.0, 1.0)
    image = image * vignette[..., None] + rng.normal(0.0, 4.0, image.shape)
    mask = (r < 1.0).astype(np.uint8) * 255
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def _sequence(rng: np.random.Generator) -> dict:
    return {
        "size": SIZES[int(rng.integers(len(SIZES)))],
        "mucosa": (rng.uniform(150, 200), rng.uniform(70, 110), rng.uniform(60, 90)),
        "polyp": (rng.uniform(190, 235), rng.uniform(90, 130), rng.uniform(80, 110)),
        "vessels": [(rng.uniform(-2, 2), rng.uniform(0.1, 0.9), rng.uniform(-0.3, 0.3), rng.uniform(1.0, 2.5))
                    for _ in range(int(rng.integers(1, 4)))],
        "centre": (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)),
        "radii": (rng.uniform(0.08, 0.2), rng.uniform(0.1, 0.25)),
        "theta": rng.uniform(0, np.pi),
        "lobes": [(rng.uniform(0, 0.12), rng.uniform(0, 2 * np.pi)) for _ in range(3)],
        "drift": (rng.normal(0, 4), rng.normal(0, 4)),
    }


def write_polyp_dataset(out_dir: Path, seed: int, frames: int) -> int:
    """Write ``frames`` frames (sequences of :data:`FRAMES_PER_SEQUENCE`) under ``out_dir/{images,masks}``."""
    from PIL import Image

    rng = np.random.default_rng([seed, 7])
    (out_dir / "images").mkdir(parents=True)
    (out_dir / "masks").mkdir()
    seq = None
    for index in range(frames):
        number, k = divmod(index, FRAMES_PER_SEQUENCE)
        if k == 0:
            seq = _sequence(rng)
        image, mask = _frame(rng, seq, k)
        name = f"{number + 1}_frame{k}.png"
        Image.fromarray(image).save(out_dir / "images" / name)
        Image.fromarray(mask).save(out_dir / "masks" / name)
    return frames
