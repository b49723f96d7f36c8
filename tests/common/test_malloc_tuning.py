import os
import subprocess
import sys

import pytest

PROBE = """
import sys
import numpy as np
from medseg.common.malloc_tuning import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20

took = keep_freed_memory() if sys.argv[1] == "keep" else False
a = np.ones(200 * 2**20 // 8)  # 200 MB, touched
high = rss_mb()
del a
print(took, round(high - rss_mb()))
"""


def _run(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_kept_for_reuse_only_when_asked_and_not_tuned_by_the_user():
    took, returned = _run("keep")
    if not took:
        pytest.skip("the C library is not glibc")
    assert returned < 20  # 200 MB freed, kept by the process
    assert _run("default")[1] > 180  # glibc's default: unmapped at once
    took, returned = _run("keep", MALLOC_ARENA_MAX="2")  # the user tuned malloc: left alone
    assert not took and returned > 180


def test_the_medseg_command_keeps_freed_memory_but_a_call_from_python_does_not(monkeypatch, tmp_path):
    from medseg import cli
    from medseg.common import malloc_tuning as allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    argv = ["predict", "--model", str(tmp_path / "missing"), str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2 and calls == []  # a test, a notebook: the caller's process is left alone
    monkeypatch.setattr(sys, "argv", ["medseg", *argv])
    assert cli.main() == 2 and calls == [True]  # the command itself


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc: Linux only")
def test_the_environment_form_gives_another_program_the_same_settings():
    """A benchmark's peer started with glibc_environment() keeps freed memory as medseg does (and medseg, seeing the
    variables, leaves them alone)."""
    from medseg.common.malloc_tuning import glibc_environment

    if not _run("keep")[0]:
        pytest.skip("the C library is not glibc")
    took, returned = _run("default", **glibc_environment())
    assert not took and returned < 20
