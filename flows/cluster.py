"""A bytewax cluster of flows.run processes: which process owns which view shard, and where
each source partition resumes when every process keeps its own state directory.

    shard s of a source (= log partition s: murmur2(key) % partitions, as the read client
    computes it) is read and written by process  s % processes  (its LogSource partition and
    its ViewSink partition both list only there; bytewax balances them over that process's
    worker threads). So the state directory of process I holds exactly the shards
    {s : s % processes == I}: a reader of key k opens the directory of process
    murmur2(k) % partitions % processes.

With `--separate-state` (one state directory per process, as on separate hosts) a process
cannot see the other processes' shards, yet a source partition must resume at the lowest
position any shard of the cluster has applied of it (a shard refuses a slice that skips records
it has not applied). Every process therefore publishes its shards' lowest positions before it
joins the cluster, and every reader of a partition takes the minimum over all processes'
publications once the cluster has formed (bytewax connects every process before any partition
is built, so each publication read is this run's):

    <warehouse>/_cluster/<source>/<views>/h<process>.json     <views>: a digest of the view names
        {"format": 1, "process_id": 0, "processes": 2, "versions": {"spend": 3, ...},
         "positions": {"0": [offset, watermark_us], ...}}   lowest applied per partition

A publication of other view versions than this process writes counts as nothing applied
(the partition is read from the start; shards skip what they hold): never too late, at worst
slower.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from connectors.objectstore import open_store
from state.store import NOTHING_APPLIED, LogPosition

CLUSTER_DIR = "_cluster"
PUBLICATION_FORMAT = 1


def owner_process(shard: int, processes: int) -> int:
    """The cluster process that owns view shard `shard` (and reads log partition `shard`)."""
    return shard % processes


@dataclass(frozen=True, slots=True)
class Cluster:
    """This process's place in the cluster; one process (the default) owns everything."""

    process_id: int = 0
    processes: int = 1
    separate_state: bool = False  # each process has its own state directory

    def owns(self, shard: int) -> bool:
        return owner_process(shard, self.processes) == self.process_id

    def state_shards(self, shards: int) -> list[int]:
        """The shards whose stores are in this process's state directory."""
        return [s for s in range(shards) if not self.separate_state or self.owns(s)]


@dataclass(frozen=True, slots=True)
class Publication:
    """A process's lowest applied position of every partition of one source."""

    process_id: int
    versions: Mapping[str, int]
    positions: Mapping[int, LogPosition]


def publish(warehouse: str | Path, source: str, cluster: Cluster, publication: Publication) -> None:
    """Write this process's publication for `source` (overwriting its previous one)."""
    body = {
        "format": PUBLICATION_FORMAT,
        "process_id": publication.process_id,
        "processes": cluster.processes,
        "versions": dict(publication.versions),
        "positions": {str(p): [x.offset, x.watermark] for p, x in publication.positions.items()},
    }
    folder = _folder(source, publication.versions)
    open_store(warehouse).write_bytes(
        f"{folder}/h{publication.process_id}.json", orjson.dumps(body)
    )


def _folder(source: str, views: Iterable[str]) -> str:
    """Publications per source and set of views: deployments running other views of the same
    source on the same warehouse keep theirs apart."""
    digest = hashlib.sha256(",".join(sorted(views)).encode()).hexdigest()[:16]
    return f"{CLUSTER_DIR}/{source}/{digest}"


def read_publications(
    warehouse: str | Path, source: str, views: Iterable[str], processes: int
) -> list[Publication | None]:
    """Every process's publication for `source` and `views`: None where a process has none,
    or an unreadable one (said on stderr; its partitions are then read from the start)."""
    store, folder = open_store(warehouse), _folder(source, views)
    found: list[Publication | None] = []
    for process in range(processes):
        rel = f"{folder}/h{process}.json"
        try:
            found.append(_parse(process, store.read_bytes(rel)))
        except FileNotFoundError:
            found.append(None)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            print(
                f"cluster: {store.describe(rel)} is not a position publication ({exc!r}); "
                "reading the partitions from the start (shards skip what they hold)",
                file=sys.stderr,
                flush=True,
            )
            found.append(None)
    return found


def _parse(process: int, raw: bytes) -> Publication:
    body = orjson.loads(raw)
    positions = {int(p): LogPosition(int(o), w) for p, (o, w) in body["positions"].items()}
    return Publication(process, dict(body["versions"]), positions)


def lowest_position(
    publications: list[Publication | None], versions: Mapping[str, int], partition: int
) -> LogPosition:
    """The lowest position of `partition` over every process; a missing publication, or one
    of other view versions, counts as nothing applied; a process without shards (no
    positions) does not count."""
    lowest: LogPosition | None = None
    for pub in publications:
        if pub is None or dict(pub.versions) != dict(versions):
            return NOTHING_APPLIED
        pos = pub.positions.get(partition)
        if pos is not None and (lowest is None or pos.offset < lowest.offset):
            lowest = pos
    return lowest or NOTHING_APPLIED


@dataclass
class ClusterStarts:
    """Where each source partition resumes in a separate-state cluster: read from every
    process's publication on first use (once the cluster has formed), then fixed for the run,
    so the reader of a partition and its `validate` step agree."""

    warehouse: str | Path
    cluster: Cluster
    _cache: dict[str, list[Publication | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def position(self, source: str, versions: Mapping[str, int], partition: int) -> LogPosition:
        with self._lock:
            if source not in self._cache:
                self._cache[source] = read_publications(
                    self.warehouse, source, versions, self.cluster.processes
                )
            publications = self._cache[source]
        return lowest_position(publications, versions, partition)


JOIN_WAIT_S = 10.0  # the longest a process waits for a lower-numbered process of its host


def wait_for_listeners(
    addresses: list[str], process_id: int, timeout_s: float = JOIN_WAIT_S
) -> None:
    """Before joining a cluster, wait until every lower-numbered process on this host listens.

    A process connects to every lower-numbered one as it joins (bytewax's timely dataflow);
    one that is not listening yet (still importing or planning, a few ms behind) refuses the
    connection, and timely retries only after a full second: a 2-process cluster on one host
    lost ~1 s of a 3 s replay to it. This waits, polling the host's listening TCP ports
    (/proc/net/tcp), for the addresses on this host; those on other hosts, a host without
    /proc, or a process still not listening after `timeout_s` are left to timely's retries.
    """
    local = {_port(a) for a in addresses[:process_id] if _on_this_host(a)}
    deadline = time.monotonic() + timeout_s
    while local and time.monotonic() < deadline:
        listening = _listening_ports()
        if listening is None:
            return
        local -= listening
        if local:
            time.sleep(0.005)


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _on_this_host(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    return ip.startswith("127.") or ip in _host_addresses()


def _host_addresses() -> set[str]:
    try:
        return set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return set()


_LISTEN = "0A"  # the TCP_LISTEN state in /proc/net/tcp


def _listening_ports() -> set[int] | None:
    """The ports of this host's listening TCP sockets; None where /proc/net/tcp is not."""
    ports: set[int] = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _LISTEN:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports if found else None
