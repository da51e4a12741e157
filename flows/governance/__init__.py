"""Governance: know what you deploy and prove it matches.

The code behind `python -m flows.plan` (diff of a definitions module against what the state
directory runs, replay cost, breaking changes), `flows.catalog` (sources -> views -> features
-> services, owners, live versions, freshness, the definitions history), `flows.skew` (logged
online reads recomputed offline) and `flows.report` (one HTML health report). The command
modules in `flows/` only parse options and call into here.
"""
