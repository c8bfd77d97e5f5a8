"""Timing for the benchmarks and the pictures: one helper, so that every figure is taken the
same way (wall time from ``time.perf_counter``, work before a call kept out of it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


def seconds(fn: Callable[[], object], repeats: int = 1, warmup: int = 0,
            before: Callable[[], object] | None = None) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; ``before`` (if
    given) runs ahead of every call, outside the time. Returns each timed call's seconds."""
    out = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


def stream_rate(stream: Iterable, n: int) -> float:
    """Items per second between the first and the last of ``n`` items of ``stream`` (the
    time to the first one, a prefill, is left out)."""
    first = last = None
    count = 0
    for _ in stream:
        last = time.perf_counter()
        if first is None:
            first = last
        count += 1
        if count == n:
            break
    if count < 2 or count != n:
        raise RuntimeError(f"expected {n} steps, got {count}")
    return (count - 1) / (last - first)
