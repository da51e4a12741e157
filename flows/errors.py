"""Errors of the application layer (definitions, commands, the dataflow).

FlowError
├── DefinitionError   a feature-definitions module or one of its objects is invalid
├── ConfigError       a command-line flag, config file or environment setting is invalid
├── SpineError        a snapshot spine file is missing, unreadable, or lacks a column
└── SnapshotError     a snapshot cannot be made as asked (an empty source, a full disk)
"""

from __future__ import annotations


class FlowError(Exception):
    """Root of every error raised by the `flows` package."""


class DefinitionError(FlowError):
    """A feature definition is invalid; the message names the value and the fix."""


class ConfigError(FlowError):
    """A setting is invalid; the message names the flag, file or variable."""


class SpineError(FlowError):
    """A snapshot spine cannot be used as given."""


class SnapshotError(FlowError):
    """A snapshot cannot be made or written as asked; the message says why and what to do."""
