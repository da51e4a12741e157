"""Errors of the serving state (view store, codecs, read client).

StateError
├── NotAViewStoreError     the directory holds no view store
├── FormatVersionError     on-disk data written by an incompatible format version
├── UnknownViewError       the view is not in the store
└── CorruptStateError      a stored value cannot be decoded
"""

from __future__ import annotations


class StateError(Exception):
    """Root of every error raised by the `state` package."""


class NotAViewStoreError(StateError):
    """The given directory is not a view store."""


class FormatVersionError(StateError):
    """Stored data uses a format version this code cannot read."""


class UnknownViewError(StateError, KeyError):
    """The view name is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown view"


class CorruptStateError(StateError):
    """A stored value is damaged."""
