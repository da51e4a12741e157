"""flows.aggregate merges a batch's keys a run at a time (MERGE_RUN_EVENTS events each): the
runs cover every key once, never split a key's events, and store the same bytes as one run; the
result of a batch holds none of its records (the sink lets them go before the commit)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 40),
            st.sampled_from([-(2**62), -5, -1, 0, 1, 2, 7, 10**6, 2**40, 2**62]),
            st.booleans(),
        ),
        max_size=60,
    ),
    st.integers(0, 2**40),
)
def test_the_merge_order_is_the_lexsort(rows: list[tuple[int, int, bool]], key_base: int) -> None:
    """The tile merge's row order (one stable sort of a composite key where it fits) equals
    `np.lexsort((boundary, tiles, keys))`, ties in row order, for negative tiles, tiles far
    apart (the lexsort fallback) and large key ids."""
    keys = np.array([key_base + k for k, _, _ in rows], dtype=np.int64)
    tiles = np.array([t for _, t, _ in rows], dtype=np.int64)
    boundary = np.array([b for _, _, b in rows], dtype=bool)
    want = np.lexsort((boundary, tiles, keys))
    assert aggregate.merge_order(keys, tiles, boundary).tolist() == want.tolist()


def test_the_merge_order_of_two_sorted_runs_is_the_lexsort() -> None:
    """The replay's case: a key's stored rows and the batch's rows, each sorted, with ties."""
    rng = np.random.default_rng(5)
    runs = []
    for n in (3000, 20000):
        k, t = rng.integers(0, 500, n), rng.integers(-50, 4000, n)
        order = np.lexsort((t, k))
        runs.append((k[order], t[order], rng.random(n) < 0.05))
    keys, tiles, boundary = (np.concatenate(parts) for parts in zip(*runs, strict=True))
    want = np.lexsort((boundary, tiles, keys))
    assert np.array_equal(aggregate.merge_order(keys, tiles, boundary), want)
