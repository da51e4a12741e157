"""flows.settings: typed settings per command, options shared by name (not by position), one
resolver with the precedence flag > environment > config file > default."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import pytest

from flows.archive import ArchiveSettings
from flows.catalog import CatalogSettings
from flows.checkpoint import CheckpointSettings
from flows.errors import ConfigError
from flows.ingest import IngestSettings
from flows.plan import PlanSettings
from flows.run import RunSettings
from flows.settings import (
    FEATURES,
    KAFKA,
    STATE,
    WAREHOUSE,
    WAREHOUSE_ENDPOINT,
    CommandSettings,
    resolve,
)
from flows.snapshot import SnapshotSettings

SHARED = {
    "features": FEATURES,
    "warehouse": WAREHOUSE,
    "state": STATE,
    "kafka": KAFKA,
    "warehouse-endpoint": WAREHOUSE_ENDPOINT,
}


@pytest.fixture(autouse=True)
def _no_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("FEATUREFLOW_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        (ArchiveSettings, ["features", "warehouse", "kafka", "warehouse-endpoint"]),
        (CatalogSettings, ["features", "state"]),
        (CheckpointSettings, ["warehouse", "state", "warehouse-endpoint"]),
        (IngestSettings, ["features", "warehouse", "warehouse-endpoint"]),
        (PlanSettings, ["features", "warehouse", "state", "kafka", "warehouse-endpoint"]),
        (SnapshotSettings, ["features", "warehouse", "state", "kafka", "warehouse-endpoint"]),
    ],
)
def test_each_command_keeps_its_common_options(
    settings: type[CommandSettings], names: list[str]
) -> None:
    options = [f for f in fields(settings) if f.name != "origin"]
    assert [o.name.replace("_", "-") for o in options[: len(names)]] == names
    for o in options[: len(names)]:  # declared once: the same default and help everywhere
        shared = SHARED[o.name.replace("_", "-")]
        assert (o.default, o.metadata["help"]) == (shared.default, shared.help)


def test_flag_wins_over_environment_over_config_file_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('workers = 4\nstate = "from-file"\nkafka = "k:1"\nuntil-caught-up = true\n')
    monkeypatch.setenv("FEATUREFLOW_CONFIG", str(config))
    monkeypatch.setenv("FEATUREFLOW_WORKERS", "3")
    monkeypatch.setenv("FEATUREFLOW_STATE", "from-env")
    s = resolve(RunSettings, ["--workers", "2"], prog="p", description="d")
    assert (s.workers, s.state, s.kafka, s.until_caught_up) == (2, "from-env", "k:1", True)
    assert (s.batch_rows, s.status_interval, s.process_id) == (4_000_000, 5.0, None)
    assert s.describe() == (
        "settings: state='from-env' (env FEATUREFLOW_STATE), kafka='k:1' (config file), "
        "workers=2 (flag), until_caught_up=True (config file)"
    )
    monkeypatch.delenv("FEATUREFLOW_CONFIG")
    monkeypatch.delenv("FEATUREFLOW_STATE")
    assert resolve(PlanSettings, [], prog="p", description="d").describe() == (
        "settings: all defaults"
    )


def test_positional_arguments_come_from_the_command_line_only(tmp_path: Path) -> None:
    s = resolve(IngestSettings, ["--force", "a.csv", "b.csv"], prog="p", description="d")
    assert (s.files, s.force, s.keep_order) == (("a.csv", "b.csv"), True, False)
    config = tmp_path / "c.toml"
    config.write_text('files = ["c.csv"]\n')
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['files'\]"):
        resolve(IngestSettings, ["--config", str(config), "a.csv"], prog="p", description="d")
