"""Hostile view and service names in the URL of the HTTP server, raw and percent-encoded: each is
a 404 that names the cause, and the server opens nothing outside the state dir.

The server runs under an audit hook (inherited by its forked worker) that logs every path the
process opens or lists, so the test sees what the server touched, not what it answered."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import make_events, run_command, write_definitions
from tests.serve_helpers import Http, serving

HOSTILE_PATHS = [
    "..",
    "%2e%2e",
    "%2E%2E",
    "..%2Fx",
    "..%2F..%2F..%2Fsecret%2Fviews%2Fspend",
    "..%2Fviews%2Fspend",
    "%2Fetc",
    "%2Fetc%2Fpasswd",
    "spend%2F",
    "spend%2F.",
    "sp%00end",
    "%00",
    "spend%0A",
    "x" * 10_000,
    "%78" * 3_000,
    "",
    ".",
    "./spend",
    "spend/",
    "../views/spend",
]

# Logs each path opened or listed to the file named by FEATUREFLOW_TEST_AUDIT (an fd opened
# before the hook, written with os.write, which raises no audit event itself).
LAUNCHER = """
import os, runpy, sys
fd = os.open(os.environ["FEATUREFLOW_TEST_AUDIT"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str):
        os.write(fd, os.path.abspath(args[0]).encode("utf-8", "replace") + b"\\n")
sys.addaudithook(hook)
sys.argv = ["flows.serve", *sys.argv[1:]]
runpy.run_module("flows.serve", run_name="__main__")
"""


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("http-names")
    features = write_definitions(root / "defs")
    pq.write_table(make_events(300, 5, seed=4), root / "e.parquet")
    common = ["--features", str(features), "--warehouse", str(root / "wh")]
    assert run_command("flows.ingest", *common, str(root / "e.parquet")).returncode == 0
    state = root / "app" / "state"
    result = run_command("flows.run", *common, "--state", str(state), "--until-caught-up")
    assert result.returncode == 0, result.stderr
    shutil.copytree(state, root / "secret")
    return state, root / "secret"


def test_hostile_names_in_the_url_are_404_and_open_nothing_outside(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    state, _ = stores
    audit = tmp_path / "opened.txt"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    with serving(state, env={"FEATUREFLOW_TEST_AUDIT": str(audit)}, launcher=launcher) as server:
        http = server.http()
        assert http.post("/v1/views/spend", {"keys": ["user1"]}).json()["rows"][0]["count"] > 0
        mark = audit.stat().st_size
        for name in HOSTILE_PATHS:
            for endpoint in ("views", "services"):
                body = {"keys": ["user1"]} if endpoint == "views" else {"rows": [{"user_id": "u"}]}
                answer = http.post(f"/v1/{endpoint}/{name}", body)
                assert answer.status == 404, (endpoint, name[:40], answer.body[:200])
                assert "unknown" in answer.error or "no endpoint" in answer.error
                assert len(answer.error) < 1000  # a 10k-character name is not echoed whole
        http.close()
        opened = audit.read_bytes()[mark:].decode().splitlines()
    assert any(p.startswith(str(state / "views")) for p in opened)  # the hook saw the worker
    outside = [p for p in opened if not _inside(p, state)]
    assert not outside, f"the server opened outside its state dir: {outside[:5]}"


def _inside(path: str, state: Path) -> bool:
    allowed = (
        str(state.resolve()) + os.sep,
        os.path.join(tempfile.gettempdir(), "featureflow-"),
    )
    return path.startswith(allowed) or "/site-packages/" in path or "/lib/python" in path


def test_percent_encoded_view_name_of_a_real_view_reads_it(stores: tuple[Path, Path]) -> None:
    """Decoding is the server's, not a path's: %73pend is the view spend."""
    with serving(stores[0]) as server:
        http: Http = server.http()
        plain = http.post("/v1/views/spend", {"keys": ["user1"]})
        encoded = http.post("/v1/views/%73pend", {"keys": ["user1"]})
        http.close()
    assert plain.status == encoded.status == 200
    assert plain.json() == encoded.json()
