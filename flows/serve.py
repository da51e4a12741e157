"""`python -m flows.serve`: the HTTP feature server over the view store (read-only).

Serves the views (and the feature services of the definitions) of --state as JSON over HTTP,
on loopback by default; see flows/serving/ for the endpoints. Each of --workers processes has its
own read client, which follows a running `flows.run` and a `flows.replay`'s version switches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flows.cli import command_main
from flows.errors import ConfigError
from flows.serving.config import ServeConfig
from flows.serving.runner import Listener, serve
from flows.settings import CommandSettings, option
from state.store import check_store


@dataclass(frozen=True, slots=True)
class ServeSettings(CommandSettings):
    state: str = option("data/state", "view store directory (RocksDB) to serve")
    features: str | None = option(
        None,
        "definitions module holding the feature services (default: the one flows.run "
        "recorded in --state)",
    )
    host: str = option("127.0.0.1", "address to listen on (loopback by default)")
    port: int = option(8080, "TCP port to listen on")
    workers: int = option(1, "server processes, each with its own read client")
    token_file: str | None = option(
        None, "file holding a bearer token that every endpoint but /healthz then requires"
    )
    batch_limit: int = option(1000, "most keys (or service rows) in one request; more is a 413")
    refresh_interval: float = option(
        0.05,
        "seconds between catch-ups with the writer: how stale a read may be (a catch-up holds "
        "the interpreter for milliseconds, so a longer interval trims tail latency)",
    )
    served_log: str | None = option(
        None,
        "warehouse (directory or URI) to log every served read to, as Parquet under _served/ "
        "(for flows.skew); off when not given",
    )
    served_log_rate: float = option(1.0, "fraction of reads logged with --served-log (0 to 1)")


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.serve", __doc__, ServeSettings, _serve, argv)


def _serve(settings: ServeSettings) -> int:
    print(settings.describe(), flush=True)
    if settings.port > 65535:
        raise ConfigError(f"--port {settings.port} is not a TCP port; give 1 to 65535")
    if not 0 < settings.refresh_interval <= 60:  # also refuses nan
        raise ConfigError(
            f"--refresh-interval {settings.refresh_interval!r} is out of range; give seconds "
            "between 0 and 60 (e.g. 0.05)"
        )
    config = ServeConfig(
        state=settings.state,
        features=settings.features,
        batch_limit=settings.batch_limit,
        token_file=settings.token_file,
        refresh_s=settings.refresh_interval,
        served_log=settings.served_log,
        served_log_rate=settings.served_log_rate,
    )
    if not 0 <= config.served_log_rate <= 1:  # also refuses nan
        raise ConfigError(
            f"--served-log-rate {config.served_log_rate!r} is out of range; give 0 to 1"
        )
    check_store(Path(config.state), create=False)
    listener = Listener(settings.host, settings.port, settings.workers)
    print(
        f"serving {config.state} on http://{listener.host}:{listener.port} "
        f"with {listener.workers} worker process(es)",
        flush=True,
    )
    serve(config, listener)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
