"""Tests of flows/: the definitions API, the core, the plan, the dataflow, one file per command."""
