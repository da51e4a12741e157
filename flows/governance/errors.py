"""Errors of the governance tools (plan, catalog, skew, report).

FlowError (flows.errors)
└── GovernanceError        a governance command cannot do what was asked
    ├── BreakingChangeError  a deployment would remove a feature a service uses
    └── ServedLogError       the served-feature log is missing or unreadable
"""

from __future__ import annotations

from flows.errors import FlowError


class GovernanceError(FlowError):
    """Root of the governance errors; the message names the value, the cause and the fix."""


class BreakingChangeError(GovernanceError):
    """`flows.run` refused definitions that break a feature service (see `flows.plan`)."""


class ServedLogError(GovernanceError):
    """The served-feature log cannot be read as asked."""
