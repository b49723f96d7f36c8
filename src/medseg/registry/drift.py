"""Check new training data against what the champion was trained on, before trusting a retrain.

Both sides are ``medseg plan`` fingerprints (``fingerprint.json``: labels, modalities, per-case spacing and shape,
foreground intensity statistics); every training run logs its own as an artifact. A different label map or
modality blocks training: the retrained model would not do the champion's job. Spacing, shape and intensity shifts
are measured and logged (MLflow metrics ``drift_*`` and ``drift.json``), and shown on the model card.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["compare_fingerprints", "drift_lines"]


def _medians(prints: dict, key: str) -> list[float]:
    values = np.array([c[key] for c in prints.get("cases", [])], dtype=float)
    return [round(float(v), 4) for v in np.median(values, axis=0)] if len(values) else []


def compare_fingerprints(champion: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """``(blocking problems, drift summary)`` of the new data's fingerprint against the champion's."""
    blocking = []
    if champion.get("labels") != new.get("labels"):
        blocking.append(f"label map {new.get('labels')} differs from the champion's {champion.get('labels')}")
    old_mods, new_mods = set(champion.get("modalities", {})), set(new.get("modalities", {}))
    if old_mods != new_mods:
        blocking.append(f"modalities {sorted(new_mods)} differ from the champion's {sorted(old_mods)}")
    drift: dict[str, Any] = {"cases": [len(champion.get("cases", [])), len(new.get("cases", []))]}
    old_sp, new_sp = _medians(champion, "spacing"), _medians(new, "spacing")
    if old_sp and new_sp:
        ratios = [n / o for o, n in zip(old_sp, new_sp) if o]
        drift.update(median_spacing=[old_sp, new_sp],
                     spacing_ratio_max=round(float(max(max(ratios), 1 / min(ratios))), 4))
    old_sh, new_sh = _medians(champion, "shape"), _medians(new, "shape")
    if old_sh and new_sh:
        drift["median_shape"] = [old_sh, new_sh]
    shifts = {}
    for modality in sorted(old_mods & new_mods):
        old = champion["modalities"][modality]["foreground_intensity"]
        now = new["modalities"][modality]["foreground_intensity"]
        scale = old.get("std") or 1.0
        shifts[modality] = {"mean_shift_sd": round((now["mean"] - old["mean"]) / scale, 4),
                            "std_ratio": round(now["std"] / scale, 4)}
    drift["intensity"] = shifts
    return blocking, drift


def drift_lines(drift: dict[str, Any]) -> list[str]:
    """The model card's section on how the training data compares with the previous champion's."""
    if not drift:
        return []
    lines = ["## Data compared with the previous champion's", "",
             f"- labelled cases: {drift['cases'][0]} then, {drift['cases'][1]} now"]
    if "median_spacing" in drift:
        lines.append(f"- median spacing (mm): {drift['median_spacing'][0]} then, {drift['median_spacing'][1]} now "
                     f"(largest ratio {drift['spacing_ratio_max']})")
    for modality, shift in drift.get("intensity", {}).items():
        lines.append(f"- {modality} foreground intensity: mean moved {shift['mean_shift_sd']:+} SD, spread x"
                     f"{shift['std_ratio']}")
    return lines + [""]
