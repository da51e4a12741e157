"""Shared command plumbing: settings resolution and clear, non-zero exits on known errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from connectors.errors import ConnectorError
from flows.errors import FlowError
from flows.settings import Option, Settings, resolve
from state.errors import StateError

EXIT_ERROR = 2
KNOWN_ERRORS = (FlowError, ConnectorError, StateError)


def command_main(
    parser: argparse.ArgumentParser,
    options: Sequence[Option],
    argv: Sequence[str] | None,
    body: Callable[[Settings, argparse.Namespace], int],
) -> int:
    """Resolve settings and run `body`; a known error prints one clear line and exits 2."""
    try:
        settings = resolve(parser, options, argv)
        args = parser.parse_args(argv)
        return body(settings, args)
    except KNOWN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a known error wrapped by bytewax (BytewaxRuntimeError)
        known = _known_cause(exc)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _known_cause(exc: BaseException) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KNOWN_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
