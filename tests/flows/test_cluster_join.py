"""A cluster process joins only once the lower-numbered processes of its host listen
(`flows.cluster.wait_for_listeners`): timely's connect retries wait a whole second."""

from __future__ import annotations

import socket
import threading
import time

from flows.cluster import wait_for_listeners


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_process_waits_until_the_lower_processes_listen() -> None:
    port = _free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later() -> None:
        time.sleep(0.2)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    later = threading.Thread(target=listen_later)
    started = time.monotonic()
    later.start()
    try:
        wait_for_listeners([f"127.0.0.1:{port}", "127.0.0.1:1"], 1, timeout_s=5)
        waited = time.monotonic() - started
        assert 0.15 < waited < 2.0
    finally:
        later.join()
        listener.close()


def test_it_waits_for_lower_numbered_local_processes_only_and_gives_up() -> None:
    silent = _free_port()  # nobody listens there
    started = time.monotonic()
    wait_for_listeners([f"127.0.0.1:{silent}"], 0, timeout_s=5)  # process 0 waits for none
    wait_for_listeners(["192.0.2.1:2101", f"127.0.0.1:{silent}"], 1, timeout_s=5)  # not local
    assert time.monotonic() - started < 0.5
    wait_for_listeners([f"127.0.0.1:{silent}", "127.0.0.1:1"], 1, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
