"""`python -m flows` lists the commands."""

from __future__ import annotations

print("""featureflow commands:
  python -m flows.run         the deployment: keep feature views fresh from the log
  python -m flows.replay      backfill: rebuild views from the log as a new version, then switch
  python -m flows.snapshot    point-in-time training snapshot for a spine file (views or a service)
  python -m flows.ingest      load history files into warehouse log segments
  python -m flows.archive     move closed Kafka offset ranges into warehouse segments
  python -m flows.serve       HTTP feature server over the view store (views and services)
  python -m flows.plan        what a definitions change will do: new/changed/removed, replay cost
  python -m flows.catalog     sources, views, features, services, owners, lineage, freshness
  python -m flows.skew        recompute logged online reads offline and report every difference
  python -m flows.report      one self-contained HTML health report with plots
  python -m flows.checkpoint  consistent copies of the live views into the warehouse
Each takes --help.""")
