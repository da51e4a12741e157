"""Start the feature server: N worker processes under granian, each with its own app and read
client (`app.create_app`), configured through the environment (`config.ServeConfig`).

Why granian: measured against uvicorn (httptools, uvloop) with the same bare ASGI app on the
same machine; the figures and the command are in the README ("HTTP feature server").
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

from flows.serving.config import CONFIG_ENV, ServeConfig

APP = "flows.serving.app:create_app"
# prometheus-client's multiprocess mode; set before it is imported, since workers are forked
# (this module must not import prometheus_client, nor anything that does)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True, slots=True)
class Listener:
    """Where and how many processes serve."""

    host: str
    port: int
    workers: int


def serve(config: ServeConfig, listener: Listener) -> None:
    """Serve until interrupted (blocks). Checks the token file and the state dir first, so a
    bad setting stops the command with one clear line instead of failing in every worker."""
    config.token()
    warning = exposure_warning(listener.host, config.token_file)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    os.environ[CONFIG_ENV] = config.to_env()
    metrics_dir = _metrics_dir(listener.workers)
    try:
        _granian(listener).serve()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def exposure_warning(host: str, token_file: str | None) -> str | None:
    """The warning printed when a non-loopback address is served without a token."""
    if token_file is not None or _loopback(host):
        return None
    return (
        f"warning: serving on {host} without --token-file: anyone who reaches this address can "
        "read every feature; give --token-file FILE, or bind to 127.0.0.1"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def _metrics_dir(workers: int) -> str | None:
    """With several processes, prometheus-client's multiprocess mode sums their metrics."""
    if workers == 1 or os.environ.get(MULTIPROC_ENV):
        return None
    directory = tempfile.mkdtemp(prefix=f"featureflow-metrics-{os.getpid()}-")
    os.environ[MULTIPROC_ENV] = directory
    return directory


def _granian(listener: Listener):  # type: ignore[no-untyped-def]  # granian's type is private
    from granian import Granian
    from granian.constants import Interfaces

    return Granian(
        APP,
        address=listener.host,
        port=listener.port,
        interface=Interfaces.ASGI,
        workers=listener.workers,
        factory=True,
        websockets=False,
        log_access=False,
        respawn_failed_workers=True,  # a worker that dies is replaced; the others go on
    )
