"""`python -m flows.serve`: the HTTP feature server over the view store (read-only).

Serves the views (and the feature services of the definitions) of --state as JSON over HTTP,
on loopback by default; see flows/serving/ for the endpoints. Each of --workers processes has its
own read client, which follows a running `flows.run` and a `flows.replay`'s version switches.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flows.cli import command_main
from flows.errors import ConfigError
from flows.serving.config import ServeConfig
from flows.serving.runner import Listener, serve
from flows.settings import Option, Settings, build_parser
from state.store import check_store

OPTIONS = (
    Option("state", "data/state", "view store directory (RocksDB) to serve"),
    Option(
        "features",
        None,
        "definitions module holding the feature services (default: the one flows.run "
        "recorded in --state)",
    ),
    Option("host", "127.0.0.1", "address to listen on (loopback by default)"),
    Option("port", 8080, "TCP port to listen on", int),
    Option("workers", 1, "server processes, each with its own read client", int),
    Option(
        "token-file",
        None,
        "file holding a bearer token that every endpoint but /healthz then requires",
    ),
    Option("batch-limit", 1000, "most keys (or service rows) in one request; more is a 413", int),
    Option(
        "refresh-interval",
        0.05,
        "seconds between catch-ups with the writer: how stale a read may be (a catch-up holds "
        "the interpreter for milliseconds, so a longer interval trims tail latency)",
        float,
    ),
    Option(
        "served-log",
        None,
        "warehouse (directory or URI) to log every served read to, as Parquet under _served/ "
        "(for flows.skew); off when not given",
    ),
    Option("served-log-rate", 1.0, "fraction of reads logged with --served-log (0 to 1)", float),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m flows.serve", __doc__.splitlines()[0], OPTIONS)
    return command_main(parser, OPTIONS, argv, _serve)


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    values = settings.values
    print(settings.describe(), flush=True)
    if values["port"] > 65535:
        raise ConfigError(f"--port {values['port']} is not a TCP port; give 1 to 65535")
    if not 0 < values["refresh_interval"] <= 60:  # also refuses nan
        raise ConfigError(
            f"--refresh-interval {values['refresh_interval']!r} is out of range; give seconds "
            "between 0 and 60 (e.g. 0.05)"
        )
    config = ServeConfig(
        state=values["state"],
        features=values["features"],
        batch_limit=values["batch_limit"],
        token_file=values["token_file"],
        refresh_s=values["refresh_interval"],
        served_log=values["served_log"],
        served_log_rate=values["served_log_rate"],
    )
    if not 0 <= config.served_log_rate <= 1:  # also refuses nan
        raise ConfigError(
            f"--served-log-rate {config.served_log_rate!r} is out of range; give 0 to 1"
        )
    check_store(Path(config.state), create=False)
    listener = Listener(values["host"], values["port"], values["workers"])
    print(
        f"serving {config.state} on http://{listener.host}:{listener.port} "
        f"with {listener.workers} worker process(es)",
        flush=True,
    )
    serve(config, listener)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
