"""Test helpers for the HTTP feature server: start `python -m flows.serve` as a subprocess on a
free loopback port and talk to it over real HTTP (http.client: raw paths, keep-alive)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tests.helpers import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> str:
        return str(self.json()["error"])


class Http:
    """One keep-alive connection to the server."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None
    ) -> Answer:
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        try:
            response = self._send(method, path, body, headers)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed the kept-alive connection after its last answer (it may, e.g.
            # after refusing a request whose body it did not read): once more, on a new one.
            self._reconnect()
            response = self._send(method, path, body, headers)
        data = response.read()
        if response.will_close:
            self._reconnect()
        return Answer(response.status, data, {k.lower(): v for k, v in response.getheaders()})

    def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        try:
            self.conn.request(method, path, body=body, headers=headers)
            return self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self._reconnect()
            raise

    def _reconnect(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def post(self, path: str, value: Any, token: str | None = None) -> Answer:
        return self.request("POST", path, orjson.dumps(value), token)

    def get(self, path: str, token: str | None = None) -> Answer:
        return self.request("GET", path, None, token)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Server:
    port: int
    process: subprocess.Popen[str]

    def http(self, token: str | None = None) -> Http:
        return Http(self.port, token)


@contextmanager
def serving(
    state: Path,
    *args: str,
    ready: bool = True,
    env: dict[str, str] | None = None,
    launcher: Path | None = None,
) -> Iterator[Server]:
    """`python -m flows.serve --state STATE --port <free> ARGS` (or `python LAUNCHER ARGS`),
    until /healthz answers (200 when `ready`), then stopped with SIGINT."""
    port = free_port()
    command = [str(launcher)] if launcher else ["-m", "flows.serve"]
    process = subprocess.Popen(
        [sys.executable, *command, "--state", str(state), "--port", str(port), *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(port, process)
    try:
        _wait_healthy(server, ready)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _wait_healthy(server: Server, ready: bool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            output = server.process.stdout.read() if server.process.stdout else ""
            raise AssertionError(f"flows.serve exited {server.process.returncode}:\n{output}")
        probe = Http(server.port)
        try:
            answer = probe.get("/healthz")
        except OSError:
            time.sleep(0.1)
            continue
        finally:
            probe.close()
        if answer.status == 200 or not ready:
            return
        time.sleep(0.1)
    raise AssertionError(f"flows.serve on port {server.port} not healthy in {timeout_s} s")
