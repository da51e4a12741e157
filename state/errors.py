"""Errors of the serving state (view store, codecs, read client).

StateError
├── NotAViewStoreError     the directory holds no view store
├── FormatVersionError     on-disk data written by an incompatible format version
├── UnknownViewError       the view is not in the store
├── CorruptStateError      a stored value cannot be decoded
├── ClientClosedError      a FeatureClient was used after close()
├── KeyTypeError           a key of a type that no view is keyed by (also a TypeError)
├── InexactReadError       a read as of a time the retained tiles cannot answer exactly
├── StaleVersionError      a switch would make an older view version live over a newer one
├── StateLockedError       another process writes the same view version
├── StateDiskFullError     the device holding the view store has no space left
└── ServiceError           a feature service cannot answer as asked
    ├── UnknownServiceError        no service of that name in the definitions
    ├── ServiceDefinitionError     the definitions (module or record) cannot give the services
    ├── ServiceRequestError        a row lacks an entity column or request field
    │   └── RequestTypeError       a request value of the wrong type (also a TypeError)
    ├── MissingFeatureError        a service's feature is not in the live version of its view
    └── OnDemandError              an on-demand function raised, or returned a wrong output
"""

from __future__ import annotations


class StateError(Exception):
    """Root of every error raised by the `state` package."""


class NotAViewStoreError(StateError):
    """The given directory is not a view store."""


class StateDiskFullError(StateError):
    """No space is left on the device holding the view store: nothing of the failed commit was
    written, and the store works again once space is freed."""


class FormatVersionError(StateError):
    """Stored data uses a format version this code cannot read."""


class UnknownViewError(StateError, KeyError):
    """The view name is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown view"


class CorruptStateError(StateError):
    """A stored value is damaged."""


class ClientClosedError(StateError):
    """The read client was closed; open a new one."""


class KeyTypeError(StateError, TypeError):
    """An entity key of a type the view is not keyed by."""


class InexactReadError(StateError):
    """The stored tiles cannot give exact values as of the asked time (use flows.snapshot)."""


class StaleVersionError(StateError):
    """Making this version live would replace a newer live version."""


class StateLockedError(StateError):
    """Another process writes this view version."""


class ServiceError(StateError):
    """A feature service cannot answer as asked; the message names the service and the cause."""


class UnknownServiceError(ServiceError, KeyError):
    """No service of that name in the definitions the client loaded."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown service"


class ServiceDefinitionError(ServiceError):
    """The definitions module (given or recorded by the deployment) cannot give the services."""


class ServiceRequestError(ServiceError):
    """A request row (or spine row) lacks an entity column or a request field."""


class RequestTypeError(ServiceRequestError, TypeError):
    """A request value is not of its field's declared type."""


class MissingFeatureError(ServiceError):
    """A service reads a feature that the live version of its view does not have."""


class OnDemandError(ServiceError):
    """An on-demand function raised, or returned an output of the wrong length or type."""
