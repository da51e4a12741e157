"""flows.metrics.ConsoleReporter: a catch-up bar (rate, ETA) when stderr is a terminal (a real
pseudo-terminal here), the periodic status lines otherwise."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pyarrow.parquet as pq

from tests.helpers import REPO, make_events, run_command, write_definitions


def test_catch_up_bar_on_a_terminal_instead_of_the_catch_up_lines(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs")
    pq.write_table(make_events(3000, 20, seed=5), tmp_path / "events.parquet")
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    assert run_command("flows.ingest", *common, str(tmp_path / "events.parquet")).returncode == 0
    terminal, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, cols
    run = ["flows.run", *common, "--state", str(tmp_path / "st"), "--until-caught-up"]
    flow = subprocess.Popen(
        [sys.executable, "-m", *run, "--status-interval", "0.05"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=child_end,
        text=True,
    )
    os.close(child_end)
    shown = bytearray()
    reader = threading.Thread(target=_read_all, args=(terminal, shown))
    reader.start()
    out, _ = flow.communicate(timeout=300)
    reader.join(timeout=60)
    os.close(terminal)
    bar = shown.decode(errors="replace")
    assert flow.returncode == 0, bar
    assert "catching up:" in bar, out
    assert "catching up:" in bar
    assert "/3.00k [" in bar  # of the 3,000 records to apply
    assert "records/s" in bar
    assert "dead letters 0" in bar
    assert "catching up" not in out  # the bar took the place of the catch-up lines
    assert "done: applied" in out


def _read_all(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every holder of the terminal's other end has closed it
            return
        if not chunk:
            return
        into.extend(chunk)


def test_status_line_counts_the_records_of_every_source() -> None:
    """Two sources (1,000 + 300 records) and three views: the catch-up line counts the records
    read of both, and says live once they are all read (it compared the largest view's events
    with both sources' records, and so stayed at 77% 'catching up' for ever)."""
    from flows.metrics import Metrics

    metrics = Metrics()
    metrics.to_catch_up = 1300
    metrics.records_read("transactions", 1000)
    line = metrics.status_line()
    assert "catching up" in line, line
    assert "1,000/1,300 records read" in line, line
    metrics.records_read("merchant_events", 300)
    assert "live" in metrics.status_line()
