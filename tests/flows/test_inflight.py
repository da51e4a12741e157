"""flows.inflight: the bound on the log rows a process holds between reading and applying."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flows.aggregate import LogSlice
from flows.inflight import RowBudget
from flows.shards import Routed


def routed(rows: int, shard: int) -> tuple[str, Routed]:
    events = pa.table({"x": list(range(rows))})
    part = LogSlice(0, shard, events, np.zeros(rows, np.int64), rows - 1, None)
    return f"s/p{shard:04d}", Routed("s", part, -1)


def test_a_read_waits_while_its_batch_would_not_fit() -> None:
    budget = RowBudget(100)
    assert budget.reserve("s/p0000", 100)  # fits exactly
    budget.settle("s/p0000", 100, 60)  # the read returned fewer rows than reserved
    assert budget.in_flight == 60
    assert not budget.reserve("s/p0001", 41)
    assert budget.reserve("s/p0001", 40)
    budget.settle("s/p0001", 40, 0)  # nothing new: nothing held
    assert budget.in_flight == 60


def test_a_batch_larger_than_the_budget_is_read_when_nothing_is_in_flight() -> None:
    budget = RowBudget(100)
    assert budget.reserve("s/p0000", 500)
    budget.settle("s/p0000", 500, 500)
    assert not budget.reserve("s/p0001", 1)
    budget.release(500)
    assert budget.reserve("s/p0001", 1)


def test_partitions_refused_read_in_the_order_they_asked() -> None:
    budget = RowBudget(100)
    assert budget.reserve("s/p0000", 100)
    budget.settle("s/p0000", 100, 100)
    assert not budget.reserve("s/p0001", 100)
    assert not budget.reserve("s/p0002", 100)
    budget.release(100)
    assert not budget.reserve("s/p0000", 100)  # partitions 1 and 2 asked first
    assert not budget.reserve("s/p0002", 100)
    assert budget.reserve("s/p0001", 100)
    budget.release(100)
    budget.leave("s/p0002")  # it stopped: its turn passes to partition 0
    assert budget.reserve("s/p0000", 100)


def test_local_parts_hold_their_rows_until_applied_the_rest_is_released() -> None:
    budget = RowBudget(1000)
    assert budget.reserve("s/p0000", 1000)
    budget.settle("s/p0000", 1000, 100)
    parts = [routed(70, 0), routed(20, 1), routed(10, 2)]
    out = budget.hand_over("s/p0000", parts, [True, False, True])
    assert [item.held for _, item in out] == [70, 0, 10]
    assert [key for key, _ in out] == ["s/p0000", "s/p0001", "s/p0002"]
    assert budget.in_flight == 80  # shard 1 is another process's: its rows left with it
    budget.release(sum(item.held for _, item in out))
    assert budget.in_flight == 0


def test_a_batch_routed_without_a_read_holds_nothing() -> None:
    budget = RowBudget(10)  # e.g. the TestingSource standing in for the log source
    out = budget.hand_over("s/p0000", [routed(5, 0)], [True])
    assert out[0][1].held == 0
    assert budget.in_flight == 0
