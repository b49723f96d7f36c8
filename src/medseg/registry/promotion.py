"""The promotion gate: a candidate and the champion scored on the same locked test cases, and the rule that decides.

Both models segment the test cases' ingested images through ``medseg predict``'s own path (each with its own
preprocessing and post-processing from its inference config), scored on the original grids (Dice and HD95 per
class, :mod:`medseg.evaluation.metrics`). The difference in mean Dice is paired by case and its 95% CI bootstrapped over
subjects. The rule's thresholds are ``register.*`` params.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from medseg.common.params import Params

__all__ = ["score_on_test", "compare", "evidence_markdown"]

log = logging.getLogger(__name__)


def score_on_test(models: list, params: Params, case_ids: list[str]) -> list[dict[str, Any]]:
    """Rows ``{case_id, subject, class, dice, hd95}`` of ``models`` (an ensemble) on the ingested test cases, scored
    as ``evaluate`` scores (:func:`medseg.evaluation.evaluate.score_cases`, without TTA)."""
    from medseg.evaluation.evaluate import score_cases
    from medseg.common.manifest import read_manifest

    return score_cases(models, params, read_manifest(params.paths.ingested), case_ids, tta=False)


def _per_case(rows: list[dict]) -> dict[str, float]:
    cases: dict[str, list[float]] = {}
    for r in rows:
        cases.setdefault(r["case_id"], []).append(r["dice"])
    return {cid: float(np.mean(v)) for cid, v in cases.items()}


def _class_means(rows: list[dict], key: str) -> dict[str, float | None]:
    out = {}
    for name in dict.fromkeys(r["class"] for r in rows):
        values = [r[key] for r in rows if r["class"] == name and r[key] is not None]
        out[name] = round(float(np.mean(values)), 4) if values else None
    return out


def compare(candidate: list[dict], champion: list[dict] | None, params: Params, seed: int = 0) -> dict[str, Any]:
    """The rule applied to two models' rows on the same test cases; ``promote`` and the evidence behind it."""
    from medseg.evaluation.metrics import bootstrap

    rule = params.register
    cand_cases = _per_case(candidate)
    subject_of = {r["case_id"]: r["subject"] for r in candidate}
    groups: dict[str, list[float]] = {}
    for cid, dice in cand_cases.items():
        groups.setdefault(subject_of[cid], []).append(dice)
    mean, lo, hi = bootstrap(list(groups.values()), seed=seed)
    result: dict[str, Any] = {
        "cases": len(cand_cases), "subjects": len(groups),
        "candidate": {"dice_mean": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)],
                      "dice": _class_means(candidate, "dice"), "hd95_mm": _class_means(candidate, "hd95")},
        "rule": (f"promote when, on the same test cases, mean Dice improves, the 95% CI of the paired difference lies "
                 f"above -{rule.noninferiority_margin:g}, no class loses more than {rule.max_class_drop:g} Dice and "
                 f"mean HD95 is not worse by more than {rule.hd95_tolerance_mm:g} mm")}
    if champion is None:
        result.update(promote=True, reasons=["no champion to compare with"])
        return result
    champ_cases = _per_case(champion)
    diffs: dict[str, list[float]] = {}
    for cid, dice in cand_cases.items():
        diffs.setdefault(subject_of[cid], []).append(dice - champ_cases[cid])
    delta, dlo, dhi = bootstrap(list(diffs.values()), seed=seed)
    cand_dice, champ_dice = result["candidate"]["dice"], _class_means(champion, "dice")
    drops = {c: round(champ_dice[c] - cand_dice[c], 4) for c in cand_dice
             if cand_dice[c] is not None and champ_dice.get(c) is not None}
    cand_hd = [v for v in result["candidate"]["hd95_mm"].values() if v is not None]
    champ_hd = [v for v in _class_means(champion, "hd95").values() if v is not None]
    hd_worse = float(np.mean(cand_hd) - np.mean(champ_hd)) if cand_hd and champ_hd else 0.0
    failed = []
    if delta <= 0:
        failed.append(f"mean Dice does not improve ({delta:+.4f})")
    if dlo <= -rule.noninferiority_margin:
        failed.append(f"the CI's lower bound {dlo:+.4f} is not above -{rule.noninferiority_margin:g}")
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > rule.max_class_drop:
        failed.append(f"{worst} loses {drops[worst]:.4f} Dice (more than {rule.max_class_drop:g})")
    if hd_worse > rule.hd95_tolerance_mm:
        failed.append(f"mean HD95 is {hd_worse:.1f} mm worse (more than {rule.hd95_tolerance_mm:g} mm)")
    result.update(
        promote=not failed, reasons=failed or ["every condition of the rule holds"],
        champion={"dice_mean": round(float(np.mean(list(champ_cases.values()))), 4), "dice": champ_dice,
                  "hd95_mm": _class_means(champion, "hd95")},
        difference={"dice_mean": round(delta, 4), "ci": [round(dlo, 4), round(dhi, 4)], "class_drop": drops,
                    "hd95_worse_mm": round(hd_worse, 2)})
    return result


def evidence_markdown(result: dict[str, Any], test_hash: str, champion_version: str | None) -> list[str]:
    """The model card's test-set section."""
    cand = result["candidate"]
    lines = ["## Locked test set", "",
             f"- {result['cases']} cases of {result['subjects']} subjects, hash `{test_hash[:16]}`",
             f"- this version: mean Dice {cand['dice_mean']} (95% CI {cand['ci'][0]} to {cand['ci'][1]})"]
    champ = result.get("champion")
    if champ:
        diff = result["difference"]
        lines += [f"- champion (version {champion_version}): mean Dice {champ['dice_mean']}",
                  f"- difference: {diff['dice_mean']:+.4f} (95% CI {diff['ci'][0]:+.4f} to {diff['ci'][1]:+.4f}, "
                  f"paired by case, bootstrapped over subjects); mean HD95 {diff['hd95_worse_mm']:+.2f} mm", ""]
    header = "| class | Dice | HD95 (mm) |" + (" champion Dice | champion HD95 |" if champ else "")
    lines += ["", header, "|---|---|---|" + ("---|---|" if champ else "")]
    for name in cand["dice"]:
        row = f"| {name} | {cand['dice'][name]} | {cand['hd95_mm'][name]} |"
        if champ:
            row += f" {champ['dice'].get(name)} | {champ['hd95_mm'].get(name)} |"
        lines.append(row)
    lines += ["", f"**Rule:** {result['rule']}.", "", "**Outcome:** " + "; ".join(result["reasons"]), ""]
    return lines
