"""flows.aggregate merges a batch's keys a run at a time (MERGE_RUN_EVENTS events each): the
runs cover every key once, never split a key's events, and store the same bytes as one run; the
result of a batch holds none of its records (the sink lets them go before the commit)."""

from __future__ import annotations

import numpy as np
import pytest

from flows import aggregate
from flows.spec import FeatureView
from state.store import PartitionProgress
from tests.flows.test_core_oracle import SKETCH_VIEW, VIEW, apply_all, make_events


def test_runs_cover_every_key_once_and_never_split_one() -> None:
    counts = [1, 9, 2, 2, 30, 1]  # events per key id, 45 in all
    key_ids = np.random.default_rng(3).permutation(np.repeat(np.arange(6), counts))
    bounds, order, ends = aggregate._key_runs(key_ids, 6, 10)
    # a run starts at the key holding each 10th event: key 4's 30 events stay in one run
    assert bounds == [0, 2, 4, 6]
    assert ends == [0, 10, 14, 45]
    for lo, hi, a, z in zip(bounds[:-1], bounds[1:], ends[:-1], ends[1:], strict=True):
        rows = order[a:z]
        assert list(rows) == sorted(rows)  # in row (offset) order
        assert sorted(set(key_ids[rows])) == list(range(lo, hi))
    assert aggregate._key_runs(key_ids, 6, 100)[0] == [0, 6]


@pytest.mark.parametrize("view", [VIEW, SKETCH_VIEW], ids=["numeric", "sketches"])
@pytest.mark.parametrize("batch", [250, 100_000])
def test_runs_of_keys_store_the_same_bytes_as_one_run(
    view: FeatureView, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = view.layout()
    events = make_events(5000, 40, seed=21)
    whole = apply_all(layout, events, batch)
    monkeypatch.setattr(aggregate, "MERGE_RUN_EVENTS", 37)  # runs of 1 to 3 keys
    assert apply_all(layout, events, batch) == whole


def test_the_result_of_a_batch_without_late_events_holds_none_of_its_records() -> None:
    events = make_events(5000, 40, seed=22)
    result = aggregate.apply_batch(
        VIEW.layout(), events, PartitionProgress(-1, None, 0, 0), lambda keys: [None] * len(keys)
    )
    assert result.late.num_rows == 0
    assert result.late.get_total_buffer_size() < 100  # a slice of the batch counts its buffers
