"""`get(at=...)` earlier than a key's newest event: exact (equal to flows.snapshot) where the
retained tiles answer it, a clear InexactReadError where they cannot; never a wrong value."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from state.client import FeatureClient
from state.codec import decode_key, entity_newest
from state.errors import InexactReadError
from state.store import ViewStore, iter_entities, partition_dir, peek
from tests.helpers import HOUR, MINUTE, SCHEMA_JSON, make_events, run_command

DEFINITIONS = """
from flows.spec import FeatureView, Source, count, max, mean, sum

txns = Source(name="txns", schema="txn.avsc", key="user_id", timestamp="ts", partitions=3)
w = FeatureView(name="w", source=txns, features=[
    count(window="1d", hop="1h"), mean("amount", window="6h", hop="1h"),
    sum("amount", window="2h", hop="10m"), max("amount", window="3h", hop="30m"),
])
"""
KEYS = [f"user{i}" for i in range(10)]
END_US = (1_780_000_000_000_000 // HOUR + 48) * HOUR + 9 * MINUTE


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("at")
    (root / "txn.avsc").write_text(SCHEMA_JSON)
    (root / "features.py").write_text(DEFINITIONS)
    # The log ends 9 minutes into an hour: every hop group's tiles of that hour are retained,
    # so reads on the hour are exact although most keys have events after it.
    events = make_events(3000, 10, seed=31)
    ts = pc.cast(events.column("ts"), pa.int64())
    pq.write_table(events.filter(pc.less(ts, END_US)), root / "e.parquet")
    common = ["--features", str(root / "features.py"), "--warehouse", str(root / "wh")]
    assert run_command("flows.ingest", *common, str(root / "e.parquet")).returncode == 0
    common += ["--state", str(root / "state")]
    result = run_command("flows.run", *common, "--until-caught-up")
    assert result.returncode == 0, result.stderr
    return root, common


def _newest(state: Path) -> dict[str, int]:
    store = ViewStore(state)
    version = store.current_version("w")
    assert version is not None
    found: dict[str, int] = {}
    for p in range(3):
        with peek(partition_dir(store.version_dir("w", version), p)) as db:
            assert db is not None
            found.update((decode_key(k), entity_newest(b)) for k, b in iter_entities(db))
    return found


def _snapshot(root: Path, common: list[str], at_us: int, name: str) -> list[dict[str, Any]]:
    spine = pa.table(
        {"user_id": KEYS, "ts": pa.array([at_us] * len(KEYS), pa.timestamp("us", tz="UTC"))}
    )
    pq.write_table(spine, root / f"{name}.parquet")
    out = root / f"{name}-out.parquet"
    result = run_command(
        "flows.snapshot", *common, "--spine", str(root / f"{name}.parquet"), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    by_key = {r["user_id"]: r for r in rows}
    return [{k[3:]: v for k, v in by_key[key].items() if k.startswith("w__")} for key in KEYS]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if v is None or w is None:
            if v is not w:
                return False
        elif not math.isclose(v, w, rel_tol=1e-9, abs_tol=1e-9):
            return False
    return True


def _exact_or_refused(
    client: FeatureClient, snap: list[dict[str, Any]], at_us: int
) -> tuple[int, int]:
    exact = refused = 0
    for key, expected in zip(KEYS, snap, strict=True):
        try:
            got = client.get("w", key, at=at_us / 1e6)
        except InexactReadError as exc:
            message = str(exc)
            assert f"key {key!r}" in message
            assert "flows.snapshot" in message
            assert "view 'w'" in message
            assert "newest event" in message
            refused += 1
            continue
        assert _same(got, expected), (key, at_us, got, expected)
        exact += 1
    return exact, refused


def test_past_reads_are_exact_or_refused(built: tuple[Path, list[str]]) -> None:
    root, common = built
    newest = _newest(root / "state")
    wm = max(newest.values())
    on_hour = wm // HOUR * HOUR  # a boundary of every hop, within every group's retention
    inside = (on_hour + wm) // 2  # on no boundary: the tiles around it mix before and after
    assert on_hour < inside < wm < on_hour + 10 * MINUTE
    with FeatureClient(root / "state") as client:
        snap = _snapshot(root, common, on_hour, "on_hour")
        exact, refused = _exact_or_refused(client, snap, on_hour)
        assert sum(n > on_hour for n in newest.values()) >= 2  # reads before their newest event
        assert exact == len(KEYS)
        snap = _snapshot(root, common, inside, "inside")
        exact, refused = _exact_or_refused(client, snap, inside)
        assert refused >= 1
        assert exact >= 1
        after = wm + 1
        snap = _snapshot(root, common, after, "after")
        assert _exact_or_refused(client, snap, after) == (len(KEYS), 0)
        with pytest.raises(InexactReadError, match="pruned"):
            client.get("w", "user1", at=(wm - 2 * 24 * HOUR) / 1e6)
