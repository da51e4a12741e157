"""flows.settings.common: commands pick common options by flag name, not by position."""

from __future__ import annotations

from types import ModuleType

import pytest

from flows import archive, catalog, checkpoint, ingest, plan, snapshot
from flows.settings import COMMON, common


def test_common_picks_by_name_in_the_order_asked_and_refuses_unknown_names() -> None:
    picked = common("kafka", "features")
    assert [o.name for o in picked] == ["kafka", "features"]
    assert all(o in COMMON for o in picked)
    with pytest.raises(ValueError, match="'feature'"):
        common("feature")


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (archive, ["features", "warehouse", "kafka", "warehouse-endpoint"]),
        (catalog, ["features", "state"]),
        (checkpoint, ["warehouse", "state", "warehouse-endpoint"]),
        (ingest, ["features", "warehouse", "warehouse-endpoint"]),
        (plan, ["features", "warehouse", "state", "kafka", "warehouse-endpoint"]),
        (snapshot, ["features", "warehouse", "state", "kafka", "warehouse-endpoint"]),
    ],
)
def test_each_command_keeps_its_common_options(module: ModuleType, names: list[str]) -> None:
    options = module.OPTIONS
    assert [o.name for o in options[: len(names)]] == names
