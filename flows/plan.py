"""`python -m flows.plan`: what a definitions change will do before `flows.run` does it.

The dataflow planner that used to live here (which view versions to write, which offsets to
read) is `flows.runplan`.
"""

from __future__ import annotations
