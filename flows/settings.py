"""Command settings: every flag also has an environment and a config-file form.

Precedence: command-line flag > environment variable `FEATUREFLOW_<FLAG>` > config file
(`--config FILE` or `FEATUREFLOW_CONFIG`, TOML, keys named like the flags with `_`) > default.
Each command prints where each non-default setting came from at start.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.objectstore import with_endpoint
from flows.errors import ConfigError

ENV_PREFIX = "FEATUREFLOW_"
EXAMPLE_FEATURES = Path(__file__).parent / "examples" / "card_transactions.py"


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: flag name, default, help, and how to parse its text form."""

    name: str
    default: Any
    help: str
    kind: type = str
    minimum: int = 1  # for int settings

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


# Every command that takes --warehouse takes this too (an s3:// warehouse's endpoint).
WAREHOUSE_ENDPOINT = Option(
    "warehouse-endpoint",
    None,
    "S3 endpoint URL of an s3:// warehouse (default: env AWS_ENDPOINT_URL, else AWS S3)",
)

COMMON = (
    Option("features", str(EXAMPLE_FEATURES), "feature definitions module (a .py file)"),
    Option(
        "warehouse",
        "data/warehouse",
        "warehouse: log segments (Parquet); a directory or an object-store URI "
        "(s3://bucket/prefix, keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
    ),
    Option("state", "data/state", "view store directory (RocksDB)"),
    Option("kafka", None, "Kafka bootstrap HOST:PORT; absent = embedded, segments only"),
    Option("workers", 1, "bytewax worker threads in this process", int),
    WAREHOUSE_ENDPOINT,
)


def common(*names: str) -> tuple[Option, ...]:
    """The common options with these flag names, in the order given: a command's OPTIONS take
    `*common("features", "warehouse", "warehouse-endpoint")` rather than a slice of COMMON.

    Raises:
        ValueError: a name is not a common option (a mistake in the command's code).
    """
    by_name = {o.name: o for o in COMMON}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"not common options: {unknown}; the common options: {list(by_name)}")
    return tuple(by_name[n] for n in names)


# Settings of every command that runs the dataflow (flows.run, flows.replay).
DATAFLOW = (
    Option("status-interval", 5.0, "seconds between console status lines", float),
    Option(
        "batch-rows",
        4_000_000,
        "records per batch when replaying segments (larger is faster, uses more memory)",
        int,
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved settings plus where each came from (flag, env, config, default)."""

    values: dict[str, Any]
    origin: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def describe(self) -> str:
        parts = [
            f"{k}={v!r} ({self.origin[k]})"
            for k, v in self.values.items()
            if self.origin[k] != "default"
        ]
        return "settings: " + (", ".join(parts) if parts else "all defaults")


def build_parser(prog: str, description: str, options: Sequence[Option]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG> "
        "(e.g. FEATUREFLOW_STATE) or in a TOML config file given with --config "
        f"(or {ENV_PREFIX}CONFIG). Flags win over the environment, which wins over the file.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file with flag values")
    for opt in options:
        flag = f"--{opt.name}"
        if opt.kind is bool:
            parser.add_argument(
                flag,
                dest=opt.dest,
                action="store_const",
                const=True,
                default=None,
                help=f"{opt.help} (env {opt.env})",
            )
        else:
            default = f" (default: {opt.default})" if opt.default is not None else ""
            parser.add_argument(
                flag,
                dest=opt.dest,
                default=None,
                metavar=opt.dest.upper(),
                help=f"{opt.help}{default}; env {opt.env}",
            )
    return parser


def resolve(
    parser: argparse.ArgumentParser, options: Sequence[Option], argv: Sequence[str] | None
) -> Settings:
    """Parse argv and merge it with the environment, the config file and the defaults."""
    args = parser.parse_args(argv)
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
            values[opt.dest], origin[opt.dest] = opt.default, "default"
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
    return Settings(values, origin)


def _convert(opt: Option, raw: Any, where: str) -> Any:
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
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--{opt.name} from {where}: {raw!r} is not an integer") from None
        if value < opt.minimum:
            raise ConfigError(f"--{opt.name} from {where}: {raw!r} must be at least {opt.minimum}")
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
