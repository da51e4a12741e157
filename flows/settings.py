"""Command settings: one frozen dataclass per command; every flag also has an environment and a
config-file form.

Precedence: command-line flag > environment variable `FEATUREFLOW_<FLAG>` > config file
(`--config FILE` or `FEATUREFLOW_CONFIG`, TOML, keys named like the flags with `_`) > default.

A command declares its options as the typed fields of a `CommandSettings` subclass, each made
by `option(default, help)` (or `Shared.field()`, for an option several commands take); the
field's type, `str`, `int`, `float` or `bool` (or one of them `| None`), says how its text form
is read. `resolve` parses argv once and fills the class, keeping where each value came from:
commands print it at start (`CommandSettings.describe`).
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from connectors.log import BATCH_BYTES as DEFAULT_BATCH_BYTES
from connectors.log import BATCH_ROWS as DEFAULT_BATCH_ROWS
from connectors.objectstore import with_endpoint
from flows.errors import ConfigError

ENV_PREFIX = "FEATUREFLOW_"
EXAMPLE_FEATURES = Path(__file__).parent / "examples" / "card_transactions.py"

T = TypeVar("T")


def option(default: T, help: str, *, minimum: int = 1) -> T:
    """A settings field that is an option: flag `--<name with ->`, environment variable
    `FEATUREFLOW_<NAME>`, config key `<name>`. `minimum` bounds an int option."""
    return field(default=default, metadata={"help": help, "minimum": minimum})


def arguments(metavar: str, help: str) -> tuple[str, ...]:
    """A settings field holding the command's positional arguments: one or more, command line
    only (they have no environment or config-file form)."""
    return field(default=(), metadata={"help": help, "metavar": metavar, "positional": True})


@dataclass(frozen=True, slots=True)
class Shared(Generic[T]):
    """An option that several commands take, declared once: `state: str = STATE.field()`."""

    default: T
    help: str

    def field(self) -> T:
        return option(self.default, self.help)


FEATURES = Shared(str(EXAMPLE_FEATURES), "feature definitions module (a .py file)")
WAREHOUSE = Shared(
    "data/warehouse",
    "warehouse: log segments (Parquet); a directory or an object-store URI "
    "(s3://bucket/prefix, keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
)
# Every command that takes --warehouse takes this too (an s3:// warehouse's endpoint).
WAREHOUSE_ENDPOINT = Shared(
    None, "S3 endpoint URL of an s3:// warehouse (default: env AWS_ENDPOINT_URL, else AWS S3)"
)
STATE = Shared("data/state", "view store directory (RocksDB)")
KAFKA = Shared(None, "Kafka bootstrap HOST:PORT; absent = embedded, segments only")
WORKERS = Shared(1, "bytewax worker threads in this process")
# Of every command that runs the dataflow (flows.run, flows.replay).
STATUS_INTERVAL = Shared(5.0, "seconds between console status lines")
BATCH_ROWS = Shared(
    DEFAULT_BATCH_ROWS,
    "at most this many records per batch when replaying segments; a worker holds one batch "
    "at a time (larger is faster, uses more memory)",
)
BATCH_MB = Shared(
    DEFAULT_BATCH_BYTES >> 20,
    "at most this many MiB of records (Arrow, as read) per batch when replaying segments: "
    "with --batch-rows, bounds a replay's memory however long the log",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandSettings:
    """A command's resolved settings (a subclass declares its options as fields) and where each
    came from: "flag", "env FEATUREFLOW_<FLAG>", "config file" or "default"."""

    origin: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> str:
        """One line: every setting not left at its default, and where it came from."""
        parts = [
            f"{name}={getattr(self, name)!r} ({where})"
            for name, where in self.origin.items()
            if where != "default"
        ]
        return "settings: " + (", ".join(parts) if parts else "all defaults")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentSettings(CommandSettings):
    """The options of a command that works on one deployment (its definitions, warehouse,
    view store and Kafka), declared once; a command's own options follow them."""

    features: str = FEATURES.field()
    warehouse: str = WAREHOUSE.field()
    state: str = STATE.field()
    kafka: str | None = KAFKA.field()
    warehouse_endpoint: str | None = WAREHOUSE_ENDPOINT.field()


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowSettings(DeploymentSettings):
    """A command that runs the dataflow (flows.run, flows.replay): the deployment's options,
    then its worker threads."""

    workers: int = WORKERS.field()


S = TypeVar("S", bound=CommandSettings)


@dataclass(frozen=True, slots=True)
class _Option:
    """An option field of a settings class, with its value type (`int` for `int | None`)."""

    field: Field[Any]
    kind: type

    @property
    def dest(self) -> str:
        return self.field.name

    @property
    def name(self) -> str:
        return self.dest.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def resolve(cls: type[S], argv: Sequence[str] | None, *, prog: str, description: str) -> S:
    """Parse argv once and fill `cls` from it, the environment, the config file and the defaults.

    Raises:
        ConfigError: a value not of its option's type or under its minimum; a config file that
            is missing, not TOML, or names a setting the command does not have.
    """
    options, positional = _fields(cls)
    args = _parser(prog, description, options, positional).parse_args(argv)
    config = _load_config(args.config or os.environ.get(f"{ENV_PREFIX}CONFIG"))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for opt in options:
        raw, where = getattr(args, opt.dest), "flag"
        if raw is None and opt.env in os.environ:
            raw, where = os.environ[opt.env], f"env {opt.env}"
        if raw is None and opt.dest in config:
            raw, where = config[opt.dest], "config file"
        if raw is None:
            values[opt.dest], origin[opt.dest] = opt.field.default, "default"
            continue
        values[opt.dest], origin[opt.dest] = _convert(opt, raw, where), where
    if values.get("warehouse_endpoint") and values.get("warehouse"):
        values["warehouse"] = with_endpoint(str(values["warehouse"]), values["warehouse_endpoint"])
    unknown = sorted(set(config) - {o.dest for o in options})
    if unknown:
        raise ConfigError(
            f"config file: unknown setting(s) {unknown}; known: "
            f"{', '.join(o.dest for o in options)}"
        )
    values.update({f.name: tuple(getattr(args, f.name)) for f in positional})
    return cls(**values, origin=MappingProxyType(origin))


def _fields(cls: type[CommandSettings]) -> tuple[list[_Option], list[Field[Any]]]:
    """The option fields of a settings class, in declaration order, and its positional ones."""
    hints = typing.get_type_hints(cls)
    options, positional = [], []
    for f in fields(cls):
        if f.metadata.get("positional"):
            positional.append(f)
        elif "help" in f.metadata:
            kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)]
            options.append(_Option(f, kinds[0] if kinds else hints[f.name]))
    return options, positional


def _parser(
    prog: str, description: str, options: Sequence[_Option], positional: Sequence[Field[Any]]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG> "
        "(e.g. FEATUREFLOW_STATE) or in a TOML config file given with --config "
        f"(or {ENV_PREFIX}CONFIG). Flags win over the environment, which wins over the file.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file with flag values")
    for opt in options:
        helped, default = opt.field.metadata["help"], opt.field.default
        if opt.kind is bool:
            how: dict[str, Any] = {"action": "store_const", "const": True}
            how["help"] = f"{helped} (env {opt.env})"
        else:
            shown = f" (default: {default})" if default is not None else ""
            how = {"metavar": opt.dest.upper(), "help": f"{helped}{shown}; env {opt.env}"}
        parser.add_argument(f"--{opt.name}", dest=opt.dest, default=None, **how)
    for f in positional:
        parser.add_argument(
            f.name, nargs="+", metavar=f.metadata["metavar"], help=f.metadata["help"]
        )
    return parser


def _convert(opt: _Option, raw: Any, where: str) -> Any:
    if opt.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"--{opt.name} from {where}: {raw!r} is not a boolean; use true/false")
    if opt.kind is int:
        minimum = opt.field.metadata["minimum"]
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--{opt.name} from {where}: {raw!r} is not an integer") from None
        if value < minimum:
            raise ConfigError(f"--{opt.name} from {where}: {raw!r} must be at least {minimum}")
        return value
    if opt.kind is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--{opt.name} from {where}: {raw!r} is not a number") from None
    return str(raw)


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from exc
    return {k.replace("-", "_"): v for k, v in data.items()}
