"""The disk-full campaign (``reliability/disk_full.py``): every stage runs out of space on a real tmpfs at a random
point of its writing, says so in one line, leaves nothing half-written, and completes when given the space back.
Needs root (mounting a tmpfs); skipped elsewhere. The CLI's side of it, without root: tests/test_cli.py."""

from __future__ import annotations

import pytest

from reliability import disk_full

WHY_NOT = disk_full.available()


@pytest.mark.skipif(WHY_NOT is not None, reason=f"disk-full campaign: {WHY_NOT}")
def test_every_stage_out_of_space_says_so_in_one_line_keeps_what_was_done_and_reruns():
    summary = disk_full.campaign(seed=0, passes=1)
    assert summary["failures"] == [], summary["failures"]
    assert summary["ran_out"] >= 5  # the random shares do stop most stages part-way
    assert all("error:" in line and ("space" in line or "full" in line) for line in summary["said"])
