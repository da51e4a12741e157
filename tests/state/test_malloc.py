"""state.malloc: glibc's thresholds are fixed once per process, unless the process chose its own
or opted out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "from state.malloc import tune_allocator; print(tune_allocator(), tune_allocator())"

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)


def _tuned(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FEATUREFLOW_"))}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_the_thresholds_are_set_once_by_default() -> None:
    assert _tuned() == "True True"


def test_a_process_that_set_its_own_thresholds_keeps_them() -> None:
    assert _tuned(MALLOC_MMAP_THRESHOLD_="131072") == "False False"
    assert _tuned(MALLOC_TRIM_THRESHOLD_="131072") == "False False"


def test_tuning_can_be_turned_off() -> None:
    assert _tuned(FEATUREFLOW_MALLOC_TUNING="0") == "False False"
