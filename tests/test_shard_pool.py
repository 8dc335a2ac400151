"""The build's worker pool: results in task order, bounded look-ahead, errors and dead workers surface."""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest

from sharding.pool import WorkerPool

_offset = 0


def _init(offset: int) -> None:
    global _offset
    _offset = offset


def _slow_square(i: int) -> int:
    time.sleep(0.002 * (i % 5))  # later tasks often finish first
    return i * i + _offset


def _fail_on_seven(i: int) -> int:
    if i == 7:
        raise OSError(f"network hiccup on {i}")
    return i


def _die_on_three(i: int) -> int:
    if i == 3:
        os._exit(9)
    return i


@pytest.fixture
def pool():
    p = WorkerPool(3, _init, (1000,))
    yield p
    p.close()


def test_results_come_in_task_order_with_the_initializer_applied(pool):
    assert list(pool.map(_slow_square, range(60))) == [i * i + 1000 for i in range(60)]
    assert list(pool.map(_slow_square, [])) == []
    assert list(pool.map(_slow_square, [4])) == [1016]  # the pool is reusable


def test_items_are_taken_lazily(pool):
    # An endless input would hang a pool that reads all tasks up front.
    assert list(itertools.islice(pool.map(_slow_square, itertools.count()), 5)) == [1000, 1001, 1004, 1009, 1016]


def test_worker_exceptions_reach_the_caller(pool):
    results = pool.map(_fail_on_seven, range(20))
    assert [next(results) for _ in range(7)] == list(range(7))
    with pytest.raises(OSError, match="network hiccup on 7"):
        next(results)


def test_a_dead_worker_stops_the_map(pool):
    with pytest.raises(RuntimeError, match="worker process died"):
        list(pool.map(_die_on_three, range(10)))


def _echo(data: bytes) -> bytes:
    return data[::-1]


def test_large_tasks_and_results_do_not_deadlock(pool):
    """Both directions of a worker's pipe full at once (big task sent while a big result is sent back)."""
    def on_alarm(*_):
        raise TimeoutError("the pool deadlocked")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    try:
        items = [bytes([i]) * (1 << 20) + bytes(range(256)) for i in range(24)]
        assert list(pool.map(_echo, items)) == [item[::-1] for item in items]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
