"""How a stage runs its per-case work: one call per case, results as the calls finish.

A *case map* is ``case_map(fn, calls)``: it runs ``fn(*args)`` for each ``args`` in ``calls`` and yields
``(index, result)`` as each call finishes, in any order. When a call fails, the calls not yet started are dropped
where the runner allows it, those already running are still yielded as they finish (their work is not lost), and
the first failure is raised at the end. ``fn`` and its arguments must be picklable when the map runs them elsewhere.

Stages run their cases through one of these by default (ingest: :func:`threads`; preprocess: :func:`in_order`); the
Prefect flow passes its own, which submits one task per case to the flow's task runner: threads in its process, or a
Dask cluster (``orchestration`` in params.yaml; ``pipelines/medseg_flow.py``). The stage's code is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from typing import Any

__all__ = ["CaseMap", "in_order", "threads", "as_finished"]

CaseMap = Callable[[Callable[..., Any], Sequence[tuple]], Iterator[tuple[int, Any]]]


def in_order(fn: Callable[..., Any], calls: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
    """One call after the other, in this thread."""
    for index, args in enumerate(calls):
        yield index, fn(*args)


def threads(workers: int) -> CaseMap:
    """A case map on a pool of ``workers`` threads (numpy, zlib and file I/O release the GIL)."""

    def case_map(fn: Callable[..., Any], calls: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        if not calls:
            return
        pool = ThreadPoolExecutor(max(1, min(workers, len(calls))))
        try:
            futures = [pool.submit(fn, *args) for args in calls]
            yield from as_finished(futures, as_completed(futures), lambda: [f.cancel() for f in futures])
        finally:  # on an early stop: the calls not started are cancelled, running ones finish
            pool.shutdown(wait=True, cancel_futures=True)

    return case_map


def as_finished(futures: Sequence[Any], completed: Iterable[Any],
                cancel_rest: Callable[[], Any] = lambda: None) -> Iterator[tuple[int, Any]]:
    """``(index in futures, result)`` for each future of ``completed`` (the futures in the order they finish) that
    succeeded; after the first failure ``cancel_rest()`` is called once, the rest are still collected, and the
    failure is raised at the end. Serves concurrent.futures and Prefect futures alike (both have ``result()``)."""
    index = {id(future): k for k, future in enumerate(futures)}
    failure: BaseException | None = None
    for future in completed:
        try:
            result = future.result()
        except CancelledError:
            continue
        except Exception as err:  # noqa: BLE001 - re-raised below, once the running calls are collected
            if failure is None:
                failure = err
                cancel_rest()
            continue
        yield index[id(future)], result
    if failure is not None:
        raise failure
