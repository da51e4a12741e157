"""`python -m flows` lists the commands."""

from __future__ import annotations

print("""featureflow commands:
  python -m flows.run       the deployment: keep feature views fresh from the log
  python -m flows.replay    backfill: rebuild views from the log as a new version, then switch
  python -m flows.snapshot  point-in-time training snapshot for a spine file
  python -m flows.ingest    load history files into warehouse log segments
  python -m flows.archive   move closed Kafka offset ranges into warehouse segments
Each takes --help.""")
