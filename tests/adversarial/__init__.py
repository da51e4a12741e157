"""Adversarial tests: bad input, races, full disks, kills, topic and version changes."""
