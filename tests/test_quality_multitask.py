"""bench.quality.multitask's round-robin batch order (reference: the order written out by hand)."""

from __future__ import annotations

import numpy as np

from bench.quality.multitask import round_robin


def test_round_robin_alternates_tasks_and_keeps_each_tasks_order() -> None:
    a = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    b = [np.array([9]), np.array([8]), np.array([7])]
    got = round_robin([a, b])
    assert [t for t, _ in got] == [0, 1, 0, 1, 0, 1]
    want = [a[0], b[0], a[1], b[1], a[2], b[2]]
    assert all(np.array_equal(x, y) for (_, x), y in zip(got, want, strict=True))


def test_round_robin_stops_at_the_shortest_task() -> None:
    got = round_robin([[np.array([1])] * 3, [np.array([2])] * 2])
    assert [t for t, _ in got] == [0, 1, 0, 1]
