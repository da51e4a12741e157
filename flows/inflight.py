"""The bound on replay memory: log rows a process has read and its view shards not yet applied.

    LogSource partition --reserve, read, settle--> route --shares of the batch's rows--> ViewSink
                                                     (rows bound for other processes: released)

A replay reads segments in batches of up to `batch_rows` (few large batches are the fast path:
each batch re-merges the stored tiles of the keys it touches). Without a bound, a worker read one
batch of each of its partitions before the views applied any, so the rows alive grew with the
number of partitions. With it, a partition reads only while the rows in flight in the process
plus its previous batch's size (`batch_rows` before the first) fit the budget (`batch_rows` per
worker), or when nothing is in flight. Live batches (a few thousand records) always fit.
Partitions refused wait their turn in the order they asked, so each gets its next batch before
any reads again (a replay advances every partition together, none starves). The budget never
blocks forever: every row taken is released once its batch is applied, or when it leaves for
another process of a cluster; a partition that stops leaves the queue.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from flows.shards import Routed


@dataclass(eq=False)
class RowBudget:
    """Rows in flight in this process (read from the log, not yet applied), at most `rows`
    unless a single batch is larger. Shared by the worker threads of the process."""

    rows: int
    _in_flight: int = 0
    _unrouted: dict[str, int] = field(default_factory=dict)  # per partition key: read, not routed
    _waiting: list[str] = field(default_factory=list)  # partitions refused, first come first
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def reserve(self, part: str, expected: int) -> bool:
        """Take `expected` rows for a read of partition `part`, if they fit (or nothing is in
        flight) and no partition refused before is still waiting for its turn."""
        with self._lock:
            fits = not self._in_flight or self._in_flight + expected <= self.rows
            if fits and (not self._waiting or self._waiting[0] == part):
                if self._waiting:
                    self._waiting.pop(0)
                self._in_flight += expected
                return True
            if part not in self._waiting:
                self._waiting.append(part)
            return False

    def leave(self, part: str) -> None:
        """The partition reads no more: it gives up its turn."""
        with self._lock:
            if part in self._waiting:
                self._waiting.remove(part)

    def settle(self, part: str, expected: int, read: int) -> None:
        """The read reserved `expected` rows and returned `read`; they stay taken until routed
        (`hand_over`) and applied."""
        with self._lock:
            self._in_flight += read - expected
            if read:
                self._unrouted[part] = self._unrouted.get(part, 0) + read

    def hand_over(
        self, part: str, routed: Sequence[tuple[str, Routed]], local: Sequence[bool]
    ) -> list[tuple[str, Routed]]:
        """The routed parts of a partition's batch, each local one holding its share of the
        batch's rows (released when it is applied); the rest is released now."""
        with self._lock:
            held = self._unrouted.pop(part, 0)
        out = []
        for (key, item), here in zip(routed, local, strict=True):
            share = min(held, item.slice.events.num_rows) if here else 0
            held -= share
            out.append((key, replace(item, held=share) if share else item))
        self.release(held)
        return out

    def release(self, rows: int) -> None:
        if rows:
            with self._lock:
                self._in_flight -= rows
