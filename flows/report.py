"""`python -m flows.report --out report.html`: one self-contained HTML health report with plots.

Per feature the value distribution and null rate; per view freshness and applied events over
time; dead letters and late events over time with their reasons; replays and version switches
on a timeline; and the skew summary of the served-feature log (as `flows.skew` computes it).
The plots are plotly charts with plotly.js inlined: the file needs no network to open.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from connectors.objectstore import replace_file
from connectors.segments import Warehouse
from flows.cli import command_main
from flows.errors import ConfigError
from flows.governance.report import ReportInputs, build_report
from flows.governance.skew import SkewReport, logged_reads, skew_report
from flows.settings import (
    DeploymentSettings,
    option,
)
from flows.spec import Definitions, load_definitions
from state.servedlog import read_served
from state.store import check_store


@dataclass(frozen=True, slots=True)
class ReportSettings(DeploymentSettings):
    out: str | None = option(None, "the HTML file to write")
    skip_skew: bool = option(False, "leave out the skew section (it replays the logged reads)")


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.report", __doc__, ReportSettings, _report, argv)


def _report(settings: ReportSettings) -> int:
    if not settings.out:
        raise ConfigError("--out FILE is required: where to write the HTML report")
    state = Path(settings.state)
    check_store(state, create=False)
    defs = load_definitions(settings.features)
    wh = Warehouse(settings.warehouse)
    skew = None if settings.skip_skew else _skew(defs, wh, settings.kafka, state)
    page = build_report(ReportInputs(defs, state, wh, settings.kafka, skew))
    out = Path(settings.out)
    replace_file(out, lambda t: t.write_text(page, encoding="utf-8"))
    print(f"report: {out} ({len(page) / 1e6:.1f} MB)")
    return 0


def _skew(defs: Definitions, wh: Warehouse, kafka: str | None, state: Path) -> SkewReport | None:
    served = read_served(wh.root)
    if not served.num_rows:
        return None
    reads, services = logged_reads(served, defs)
    return skew_report(defs, reads, wh, kafka, state, services=services)


if __name__ == "__main__":
    sys.exit(main())
