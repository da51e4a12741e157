"""Defence in depth on the write path: no record that reaches the dataflow can stop it.

Validation and aggregation are tried on the whole batch first (the fast path). If either raises
an error that is not an infrastructure failure or a broken definition (disk, store, Kafka, a
transform that returns no table or drops needed columns: those stop the flow as they must), the
batch is bisected until the records that fail on their own are found; those become dead letters
naming the error, and every other record is applied as it would have been. Applying the good
parts in offset order against an overlay of the blobs written so far gives the same tiles as one
pass without the bad records.

Many failing records mean a bug in the definitions (a transform that fails on everything), not
bad data: past MAX_POISON records of one batch the flow stops with a message saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from connectors.envelope import OFFSET, DeadLetter
from connectors.errors import ConnectorError
from connectors.log import LogBatch
from flows.aggregate import (
    ApplyResult,
    BlobGetter,
    LogSlice,
    apply_batch,
    apply_slices,
    prepare,
)
from flows.errors import FlowError
from flows.spec import FeatureView
from flows.validate import EventRules, record_payload, validate
from state.bulk import BulkCommit
from state.errors import StateError
from state.layout import ViewLayout
from state.store import PartitionProgress

MAX_POISON = 100
_INFRA = (ConnectorError, FlowError, StateError, OSError, MemoryError)


def validate_guarded(batch: LogBatch, rules: EventRules) -> LogBatch:
    """`validate`, with the records it cannot even check turned into dead letters."""
    try:
        return validate(batch, rules)
    except _INFRA:
        raise
    except Exception as exc:
        return _validate_halves(batch, rules, exc)


def _validate_halves(batch: LogBatch, rules: EventRules, exc: Exception) -> LogBatch:
    events = batch.events
    if events.num_rows == 1:
        letter = _letter(f"source {rules.source!r}", events, 0, batch.partition, exc)
        return LogBatch(
            batch.source,
            batch.partition,
            events.slice(0, 0),
            (*batch.dead_letters, letter),
            batch.next_offset,
        )
    mid = events.num_rows // 2
    parts = [
        validate_guarded(
            LogBatch(batch.source, batch.partition, half, (), batch.next_offset), rules
        )
        for half in (events.slice(0, mid), events.slice(mid))
    ]
    return LogBatch(
        batch.source,
        batch.partition,
        pa.concat_tables([p.events for p in parts]),
        (*batch.dead_letters, *parts[0].dead_letters, *parts[1].dead_letters),
        batch.next_offset,
    )


def transform_guarded(
    view: str,
    layout: ViewLayout,
    events: pa.Table,
    transform: Callable[[pa.Table], pa.Table] | None,
    partition: int,
) -> tuple[pa.Table, list[DeadLetter]]:
    """A view's transform over `events`, with the records it fails on alone as dead letters
    (the re-keyed path, which transforms before routing)."""
    poison: list[DeadLetter] = []
    parts = _transform_halves(view, layout, events, transform, partition, poison)
    return (pa.concat_tables(parts) if len(parts) > 1 else parts[0]), poison


def _transform_halves(
    view: str,
    layout: ViewLayout,
    events: pa.Table,
    transform: Callable[[pa.Table], pa.Table] | None,
    partition: int,
    poison: list[DeadLetter],
) -> list[pa.Table]:
    try:
        return [prepare(events, layout, transform)]
    except _INFRA:
        raise
    except Exception as exc:
        if events.num_rows == 1:
            poison.append(_letter(f"view {view!r}", events, 0, partition, exc))
            if len(poison) > MAX_POISON:
                raise _bug(view, partition, exc) from exc
            return []
        mid = events.num_rows // 2
        return [
            t
            for half in (events.slice(0, mid), events.slice(mid))
            for t in _transform_halves(view, layout, half, transform, partition, poison)
        ] or [events.slice(0, 0)]


def _bug(view: str, partition: int, error: Exception) -> FlowError:
    return FlowError(
        f"view {view!r}: more than {MAX_POISON} records of source partition {partition} fail "
        f"to aggregate ({type(error).__name__}: {error}); that is a bug in the view's "
        "transform or definition, not bad data: fix it and restart"
    )


@dataclass
class _Bisection:
    """The running result of applying a slice piece by piece."""

    view: FeatureView
    progress: PartitionProgress
    get_blobs: BlobGetter
    overlay: dict[bytes, bytes] = field(default_factory=dict)
    late: list[pa.Table] = field(default_factory=list)
    poison: list[DeadLetter] = field(default_factory=list)
    applied: int = 0

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        stored = self.get_blobs(keys)
        return [self.overlay.get(k, s) for k, s in zip(keys, stored, strict=True)]

    def attempt(self, layout: ViewLayout, piece: LogSlice) -> Exception | None:
        try:
            result = apply_batch(layout, piece, self.progress, self.get, self.view.transform)
        except _INFRA:
            raise
        except Exception as exc:
            return exc
        self.overlay.update(result.puts)
        self.progress = result.progress
        self.late.append(result.late)
        self.applied += result.applied
        return None


def apply_guarded(
    view: FeatureView,
    layout: ViewLayout,
    slices: Sequence[LogSlice],
    progress: PartitionProgress,
    get_blobs: Callable[[Sequence[bytes]], list[bytes | None]],
    bulk: BulkCommit | None = None,
) -> ApplyResult:
    """`apply_slices`, with the records that fail on their own moved to `poison`. With `bulk`,
    the new blobs go into it as they are made; when a record fails, what it took is dropped
    and the bisection's blobs come back in the result's `puts`."""
    try:
        sink = bulk.add if bulk is not None else None
        return apply_slices(layout, slices, progress, get_blobs, view.transform, sink)
    except _INFRA:
        raise
    except Exception as exc:  # bisected slice by slice below
        first = exc
    if bulk is not None:
        bulk.reset()
    run = _Bisection(view, progress, get_blobs)
    for part in slices:
        error = run.attempt(layout, part)
        if error is None:
            continue
        mid = part.events.num_rows // 2
        _halves(run, layout, part, 0, mid, error)
        _halves(run, layout, part, mid, part.events.num_rows, error)
        closing = _piece(part, 0, 0, last=True)  # move the position past any trailing poison
        if run.attempt(layout, closing) is not None:
            raise FlowError(f"view {view.name!r}: an empty batch failed to apply") from first
    late = pa.concat_tables(run.late) if run.late else slices[0].events.schema.empty_table()
    return ApplyResult(run.overlay, run.progress, late, run.applied, tuple(run.poison))


def _halves(
    run: _Bisection, layout: ViewLayout, part: LogSlice, lo: int, hi: int, exc: Exception
) -> None:
    if hi <= lo:
        return
    error = run.attempt(layout, _piece(part, lo, hi, last=False))
    if error is None:
        return
    if hi - lo == 1:
        run.poison.append(
            _letter(f"view {run.view.name!r}", part.events, lo, part.partition, error)
        )
        if len(run.poison) > MAX_POISON:
            raise _bug(run.view.name, part.partition, error) from error
        return
    mid = (lo + hi) // 2
    _halves(run, layout, part, lo, mid, error)
    _halves(run, layout, part, mid, hi, error)


def _piece(part: LogSlice, lo: int, hi: int, *, last: bool) -> LogSlice:
    """Rows lo..hi of a slice; it covers the log through its last row (or the whole slice's
    end when `last`), so pieces applied in order move the position exactly as the slice does."""
    events = part.events.slice(lo, hi - lo)
    marks = part.watermarks[lo:hi]
    if last:
        return LogSlice(
            part.partition, part.shard, events, marks, part.through_offset, part.end_watermark
        )
    through = int(np.asarray(events.column(OFFSET).to_numpy())[-1])
    return LogSlice(part.partition, part.shard, events, marks, through, int(marks[-1]))


def _letter(where: str, events: pa.Table, row: int, partition: int, exc: Exception) -> DeadLetter:
    offset = int(events.column(OFFSET)[row].as_py())
    return DeadLetter(
        reason=f"{where}: record at offset {offset} cannot be processed "
        f"({type(exc).__name__}: {exc}); the rest of the batch was applied",
        partition=partition,
        offset=offset,
        payload=record_payload(events, row),
    )
