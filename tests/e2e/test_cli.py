"""Every command's --help, and bad input: a clear message, a non-zero exit, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.segments import Warehouse
from tests.helpers import make_events, run_command, write_definitions

COMMANDS = {
    "flows.run": [
        "--features",
        "--warehouse",
        "--state",
        "--kafka",
        "--workers",
        "--until-caught-up",
        "--metrics-port",
        "--config",
    ],
    "flows.replay": ["--features", "--warehouse", "--state", "--kafka", "--views", "--from-time"],
    "flows.snapshot": ["--features", "--warehouse", "--spine", "--out", "--views", "--kafka"],
    "flows.ingest": ["--features", "--warehouse", "--source", "FILE"],
    "flows.archive": ["--features", "--warehouse", "--kafka", "--segment-rows", "--max-age"],
}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_documents_every_flag(module: str) -> None:
    result = run_command(module, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in COMMANDS[module]:
        assert flag in result.stdout, f"{module} --help does not mention {flag}"
    assert "FEATUREFLOW_" in result.stdout  # the environment form is documented


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    features = write_definitions(tmp_path / "defs")
    pq.write_table(make_events(500, 10, seed=1), tmp_path / "good.parquet")
    result = run_command(
        "flows.ingest",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        str(tmp_path / "good.parquet"),
    )
    assert result.returncode == 0, result.stderr
    return tmp_path, features


def test_unknown_view(project: tuple[Path, Path]) -> None:
    root, features = project
    spine = pa.table({"user_id": ["user1"], "ts": pa.array([0], pa.timestamp("us", tz="UTC"))})
    pq.write_table(spine, root / "spine.parquet")
    out = root / "snap.parquet"
    result = run_command(
        "flows.snapshot",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--spine",
        str(root / "spine.parquet"),
        "--out",
        str(out),
        "--views",
        "spend,nope",
    )
    assert result.returncode == 2
    assert "unknown view(s) 'nope'" in result.stderr
    assert "spend" in result.stderr
    assert not out.exists()
    result = run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--state",
        str(root / "st"),
        "--views",
        "nope",
        "--until-caught-up",
    )
    assert result.returncode == 2
    assert "unknown view(s) 'nope'" in result.stderr


def test_file_with_missing_column_writes_nothing(project: tuple[Path, Path]) -> None:
    root, features = project
    before = [s.file for p in range(3) for s in Warehouse(root / "wh").segments("txns", p)]
    bad = make_events(50, 5, seed=2).drop_columns(["amount"])
    pq.write_table(bad, root / "bad.parquet")
    pq.write_table(make_events(50, 5, seed=3), root / "fine.parquet")
    result = run_command(
        "flows.ingest",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        str(root / "fine.parquet"),
        str(root / "bad.parquet"),
    )
    assert result.returncode == 2
    assert "amount" in result.stderr
    assert "bad.parquet" in result.stderr
    after = [s.file for p in range(3) for s in Warehouse(root / "wh").segments("txns", p)]
    assert after == before  # the good file was not half-ingested either


def test_corrupt_parquet(project: tuple[Path, Path]) -> None:
    root, features = project
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    result = run_command(
        "flows.ingest",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        str(root / "corrupt.parquet"),
    )
    assert result.returncode == 2
    assert "corrupt.parquet" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_segment_stops_run_with_clear_error(project: tuple[Path, Path]) -> None:
    root, features = project
    wh = Warehouse(root / "wh")
    seg = next(s for p in range(3) for s in wh.segments("txns", p))
    wh.path("txns", seg).write_bytes(b"garbage")
    result = run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--state",
        str(root / "st"),
        "--until-caught-up",
    )
    assert result.returncode != 0
    assert seg.file.split("/")[-1] in result.stderr


def test_definitions_module_with_an_error(tmp_path: Path) -> None:
    features = write_definitions(tmp_path)
    text = features.read_text().replace('window="2h", hop="10m"', 'window="2h", hop="7m"')
    features.write_text(text)
    result = run_command(
        "flows.run",
        "--features",
        str(features),
        "--until-caught-up",
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / "st"),
    )
    assert result.returncode == 2
    assert "hop '7m' does not divide window '2h'" in result.stderr
    features.write_text("import nonexistent_module_xyz\n")
    result = run_command(
        "flows.snapshot",
        "--features",
        str(features),
        "--spine",
        "x.parquet",
        "--out",
        str(tmp_path / "o.parquet"),
    )
    assert result.returncode == 2
    assert "nonexistent_module_xyz" in result.stderr
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())


def test_unknown_field_in_definitions(tmp_path: Path) -> None:
    features = write_definitions(tmp_path)
    features.write_text(features.read_text().replace('min("amount"', 'min("amont"'))
    result = run_command("flows.ingest", "--features", str(features), "x.parquet")
    assert result.returncode == 2
    assert "unknown field 'amont'" in result.stderr


def test_bad_flag_values(tmp_path: Path) -> None:
    result = run_command("flows.run", "--workers", "zero")
    assert result.returncode == 2
    assert "--workers" in result.stderr
    result = run_command("flows.run", "--until-caught-up", env={"FEATUREFLOW_WORKERS": "-1"})
    assert result.returncode == 2
    assert "FEATUREFLOW_WORKERS" in result.stderr
    (tmp_path / "c.toml").write_text("stat = 'x'\n")
    result = run_command("flows.run", "--config", str(tmp_path / "c.toml"))
    assert result.returncode == 2
    assert "unknown setting" in result.stderr
