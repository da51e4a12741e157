"""Loading a definitions module: `load_definitions` imports it, collects its sources, views and
services, and validates them together.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flows.errors import DefinitionError
from flows.spec.services import FeatureService, OnDemand, _view_part
from flows.spec.sources import Source, _find_schema
from flows.spec.views import FeatureSelection, FeatureView
from state.layout import (
    ViewLayout,
)
from state.services import ServicePlan


@dataclass(frozen=True, slots=True)
class Definitions:
    """Everything a definitions module declares."""

    path: Path
    sources: dict[str, Source]
    views: dict[str, FeatureView]
    layouts: dict[str, ViewLayout]
    services: dict[str, FeatureService] = field(default_factory=dict)
    plans: dict[str, ServicePlan] = field(default_factory=dict)

    def service(self, name: str) -> tuple[FeatureService, ServicePlan]:
        """A service and its plan.

        Raises:
            DefinitionError: no service of that name in the module.
        """
        if name not in self.services:
            raise DefinitionError(
                f"unknown feature service {name!r} in {self.path}; defined services: "
                f"{', '.join(self.services) or '(none)'}"
            )
        return self.services[name], self.plans[name]

    def schema_files(self) -> dict[str, Path]:
        """The schema files the module names by relative path (as named -> file), which a
        copy of the module beside them needs."""
        files: dict[str, Path] = {}
        for source in self.sources.values():
            for schema in (source.schema, *source.previous_schemas):
                if isinstance(schema, Mapping) or Path(schema).is_absolute():
                    continue
                files[Path(schema).as_posix()] = _find_schema(Path(schema), source.base_dir)
        return files

    def select(self, names: Sequence[str] | None) -> list[FeatureView]:
        if not names:
            return list(self.views.values())
        unknown = [n for n in names if n not in self.views]
        if unknown:
            raise DefinitionError(
                f"unknown view(s) {', '.join(map(repr, unknown))} in {self.path};"
                f" defined views: {', '.join(self.views) or '(none)'}"
            )
        return [self.views[n] for n in names]


def load_definitions(path: str | Path) -> Definitions:
    """Import a definitions module and validate every source and view in it.

    Raises:
        DefinitionError: the file is missing, fails to import, or a definition is invalid.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise DefinitionError(
            f"definitions module {str(path)!r} not found; pass --features "
            "with the path of a Python file that declares FeatureViews"
        )
    module_name = f"_featureflow_defs_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"definitions module {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except DefinitionError as exc:
        raise DefinitionError(f"definitions module {path}: {exc}") from exc
    except Exception as exc:
        raise DefinitionError(
            f"definitions module {path} failed to import: "
            f"{type(exc).__name__}: {exc}; fix the module"
        ) from exc
    finally:
        sys.modules.pop(module_name, None)
    views: dict[str, FeatureView] = {}
    sources: dict[str, Source] = {}
    services: dict[str, FeatureService] = {}
    for value in vars(module).values():
        if isinstance(value, FeatureView):
            value = _with_base(value, path.parent)
            views[value.name] = value
            sources[value.source.name] = value.source
        elif isinstance(value, Source):
            sources.setdefault(value.name, _source_with_base(value, path.parent))
        elif (
            isinstance(value, FeatureService)
            and services.setdefault(value.name, value) is not value
        ):
            raise DefinitionError(
                f"definitions module {path}: two feature services are named "
                f"{value.name!r}; give each its own name"
            )
    plans = {name: _checked_plan(path, service) for name, service in services.items()}
    for service in services.values():
        for view in _service_views(service):
            if view.name not in views:
                views[view.name] = _with_base(view, path.parent)
                sources.setdefault(view.source.name, views[view.name].source)
    if not views:
        raise DefinitionError(f"definitions module {path} declares no FeatureView")
    layouts = {name: view.layout() for name, view in views.items()}
    return Definitions(
        path=path,
        sources=sources,
        views=views,
        layouts=layouts,
        services=services,
        plans=plans,
    )


def _checked_plan(path: Path, service: FeatureService) -> ServicePlan:
    try:
        return service.service_plan()
    except DefinitionError as exc:
        raise DefinitionError(f"definitions module {path}: {exc}") from exc


def _service_views(service: FeatureService) -> list[FeatureView]:
    found: list[FeatureView] = []
    for item in service.features:
        if isinstance(item, OnDemand):
            found += [view for view, _ in item.views()]
        elif isinstance(item, FeatureView | FeatureSelection):
            found.append(_view_part(item)[0])
    return found


def _source_with_base(source: Source, base: Path) -> Source:
    if source.base_dir is not None:
        return source
    return dataclasses.replace(source, base_dir=base)


def _with_base(view: FeatureView, base: Path) -> FeatureView:
    return dataclasses.replace(view, source=_source_with_base(view.source, base))
