"""The definitions record: the deployment's definitions module, kept in the state directory.

`flows.run` records the definitions module it runs (and the schema files it reads) so that a
`FeatureClient(state_dir)` without `features=` finds the feature services and on-demand
functions of the views it serves. A record is immutable and named by the SHA-256 of its files;
a pointer names the live one and is replaced atomically:

    <state>/definitions/
        CURRENT                       "<sha256>\\n" of the live record
        <sha256>/record.json          {"format": 1, "module": "features.py",
                                       "files": ["features.py", "schemas/x.avsc"],
                                       "views": {"user_spend": 3, ...}}  # versions described
        <sha256>/features.py          the module, as run
        <sha256>/schemas/x.avsc       each schema file, at the path the module names it by

The client imports the recorded module with importlib (the module itself imports flows.spec;
`state` never imports `flows`) and collects every object with a `service_plan()` method.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from connectors.objectstore import owned_temp
from state.errors import ServiceDefinitionError
from state.services import ServicePlan
from state.store import _write_atomic, disk_full_named, left_by_dead

RECORD_FORMAT = 1
DEFINITIONS_DIR = "definitions"
POINTER = "CURRENT"


def record_definitions(
    root: Path, module: Path, files: Mapping[str, Path], views: Mapping[str, int]
) -> str:
    """Record `module` and `files` (record-relative path -> file) and point at them.

    Args:
        root: the state directory.
        module: the definitions module.
        files: other files the module names by relative path (its schema files).
        views: the version of each view these definitions describe.

    Returns:
        The record's name (SHA-256 of its files).
    """
    contents = {module.name: module.read_bytes()}
    contents.update((rel, path.read_bytes()) for rel, path in sorted(files.items()))
    digest = hashlib.sha256()
    for rel, data in contents.items():
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    sha = digest.hexdigest()
    base = root / DEFINITIONS_DIR
    target = base / sha
    with disk_full_named(base, "recording the definitions"):
        if not (target / "record.json").is_file():
            _write_record(target, contents, module.name, views)
        _write_atomic(base / POINTER, f"{sha}\n".encode())
    return sha


def _write_record(
    target: Path, contents: Mapping[str, bytes], module: str, views: Mapping[str, int]
) -> None:
    for leftover in left_by_dead(target.parent.glob(f".{target.name}.tmp-*")):  # killed recorders'
        shutil.rmtree(leftover, ignore_errors=True)
    staging = owned_temp(target)  # two recorders at once must not write into one directory
    shutil.rmtree(staging, ignore_errors=True)
    for rel, data in contents.items():
        path = staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    meta = {"format": RECORD_FORMAT, "module": module, "files": list(contents)}
    meta["views"] = dict(views)
    (staging / "record.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    try:
        staging.rename(target)
    except OSError:  # another process recorded the same definitions meanwhile
        shutil.rmtree(staging, ignore_errors=True)


def recorded_module(root: Path) -> tuple[str, Path] | None:
    """(record name, module path) of the live record, None when nothing is recorded.

    Raises:
        ServiceDefinitionError: the pointer names a record that is missing or unreadable.
    """
    pointer = root / DEFINITIONS_DIR / POINTER
    if not pointer.is_file():
        return None
    sha = pointer.read_text().strip()
    meta_path = root / DEFINITIONS_DIR / sha / "record.json"
    try:
        meta = orjson.loads(meta_path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ServiceDefinitionError(
            f"the definitions record {meta_path} is missing or damaged ({exc}); run flows.run "
            "again to record the definitions, or pass FeatureClient(..., features=FILE)"
        ) from exc
    if meta.get("format") != RECORD_FORMAT:
        raise ServiceDefinitionError(
            f"the definitions record {meta_path} has format {meta.get('format')!r}, this code "
            f"reads format {RECORD_FORMAT}; run flows.run of this release to record it again"
        )
    return sha, meta_path.parent / str(meta["module"])


def load_service_plans(path: Path) -> dict[str, ServicePlan]:
    """Import a definitions module and reduce each feature service in it to its plan.

    Raises:
        ServiceDefinitionError: the module is missing, fails to import, or a service in it is
            invalid (the message names the module and the cause).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ServiceDefinitionError(
            f"definitions module {str(path)!r} not found; pass features= the path of the "
            "Python file that declares the feature services"
        )
    module = _import(path)
    plans: dict[str, ServicePlan] = {}
    for value in vars(module).values():
        if isinstance(value, type) or not callable(getattr(value, "service_plan", None)):
            continue
        try:
            plan = value.service_plan()
        except Exception as exc:
            raise ServiceDefinitionError(f"definitions module {path}: {exc}") from exc
        if not isinstance(plan, ServicePlan):
            continue
        plans[plan.name] = plan
    helpers = sys.modules.get("flows.ondemand")
    if plans and helpers is not None:  # compiled now, not by the first request that uses them
        helpers.warm_up()
    return plans


def _import(path: Path) -> Any:
    name = f"_featureflow_services_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ServiceDefinitionError(f"definitions module {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ServiceDefinitionError(
            f"definitions module {path} failed to import: {type(exc).__name__}: {exc}; fix "
            "the module"
        ) from exc
    finally:
        sys.modules.pop(name, None)
    return module
