"""`python -m flows.catalog`: sources -> views -> features -> services, with types, windows,
hops, owners, tags, live versions, freshness and consumers; a search by name or tag; the
definitions history of a view (`--history VIEW`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from flows.cli import command_main
from flows.errors import ConfigError
from flows.governance.catalog import build_catalog, catalog_lines, search_catalog
from flows.governance.history import view_history
from flows.settings import FEATURES, STATE, CommandSettings, option
from flows.spec import load_definitions


@dataclasses.dataclass(frozen=True, slots=True)
class CatalogSettings(CommandSettings):
    features: str = FEATURES.field()
    state: str = STATE.field()
    search: str | None = option(
        None, "only what matches this text (names and descriptions, any case)"
    )
    tag: str | None = option(None, "only what carries this tag: KEY or KEY=VALUE")
    history: str | None = option(None, "print the definitions history of this view")
    json: bool = option(False, "print the catalog as one JSON document")


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.catalog", __doc__, CatalogSettings, _catalog, argv)


def _catalog(settings: CatalogSettings) -> int:
    state = Path(settings.state)
    if settings.history:
        return _history(state, settings.history, settings.json)
    catalog = build_catalog(load_definitions(settings.features), state)
    catalog = search_catalog(catalog, settings.search, settings.tag)
    if settings.json:
        print(orjson.dumps(dataclasses.asdict(catalog), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(catalog_lines(catalog)))
    return 0


def _history(state: Path, view: str, as_json: bool) -> int:
    revisions = view_history(state, view)
    if not revisions:
        raise ConfigError(
            f"--history {view!r}: no deployment in {state} recorded view {view!r}; check the "
            "view name and --state (flows.run records the definitions it runs)"
        )
    if as_json:
        print(orjson.dumps([dataclasses.asdict(r) for r in revisions]).decode())
        return 0
    for r in revisions:
        print(
            f"{view} v{r.version}  layout sha256 {r.layout_sha256}  definitions {r.record[:12]}  "
            f"recorded {r.recorded_at}  features: {', '.join(r.features)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
