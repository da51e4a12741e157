"""The deployment's guard: `flows.run` refuses definitions that break a feature service.

A recorded service (what the running deployment serves, so what models were trained on) whose
feature the new definitions take away is a breaking change. Nothing has been written when the
guard refuses: the live versions, the recorded definitions and the served services stay as
they were, until the run is repeated with `--allow-breaking`.
"""

from __future__ import annotations

from pathlib import Path

from flows.governance.deployed import read_deployed
from flows.governance.diff import find_breaking
from flows.governance.errors import BreakingChangeError
from flows.spec import Definitions


def refuse_breaking(defs: Definitions, state: Path) -> None:
    """Raise when `defs` take away a feature a service recorded in `state` serves.

    Raises:
        BreakingChangeError: naming each service column, why it breaks and the fix.
    """
    deployed = read_deployed(state)
    found = find_breaking(defs, deployed.definitions)
    if not found:
        return
    listed = "; ".join(f"service {b.service!r} column {b.column!r}: {b.reason}" for b in found)
    raise BreakingChangeError(
        f"definitions {defs.path} break what the deployment in {state} serves ({listed}): a "
        "model trained on these columns would get nothing. The live versions are unchanged. "
        "Check with python -m flows.plan, update the models, then run flows.run with "
        "--allow-breaking"
    )
