"""How a campaign ends: its summary as JSON (printed, and written to ``--out``), one stderr line per failure, and
the exit code (1 when anything failed)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def finish(summary: dict, out: Path | None, describe: Callable[[dict], str]) -> int:
    text = json.dumps(summary, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)
    for failure in summary["failures"]:
        print(f"FAILED seed {failure['seed']} {describe(failure)}", file=sys.stderr)
    return 1 if summary["failures"] else 0
