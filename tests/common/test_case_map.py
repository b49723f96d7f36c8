import time

import pytest

from medseg.common.case_map import in_order, threads


def test_in_order_yields_each_index_with_its_result():
    assert list(in_order(pow, [(2, 3), (3, 2)])) == [(0, 8), (1, 9)]


def test_a_failure_still_yields_the_calls_already_running_then_raises():
    """The failing call finishes first; the slower one running beside it is still yielded, then the failure is
    raised (the record of finished work is not lost with it)."""
    def work(k):
        if k == 0:
            raise OSError("disk full")
        time.sleep(0.3 if k == 1 else 0)
        return k * 10

    got = []
    with pytest.raises(OSError, match="disk full"):
        for index, result in threads(2)(work, [(0,), (1,), (2,), (3,)]):
            got.append((index, result))
    assert (1, 10) in got and all(index != 0 for index, _ in got)


def test_threads_map_runs_every_call_once():
    assert sorted(threads(3)(lambda x: x + 1, [(k,) for k in range(10)])) == [(k, k + 1) for k in range(10)]
