"""`python -m flows.checkpoint`: consistent copies of the live views into the warehouse.

Each view's live version is exported shard by shard (tiles and applied offsets together) to
`<warehouse>/_checkpoints/<view>/<id>/` with a manifest of sha256 checksums (flows.checkpoints
holds the format and the logic); older checkpoints are pruned to `--keep`. Safe while flows.run
writes: shards are read through RocksDB secondaries. `flows.run --restore` loads the newest good
one into an empty state directory and continues from its offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flows.checkpoints import write_checkpoints
from flows.cli import command_main, exit_command
from flows.settings import STATE, WAREHOUSE, WAREHOUSE_ENDPOINT, CommandSettings, option


@dataclass(frozen=True, slots=True)
class CheckpointSettings(CommandSettings):
    warehouse: str = WAREHOUSE.field()
    state: str = STATE.field()
    warehouse_endpoint: str | None = WAREHOUSE_ENDPOINT.field()
    views: str | None = option(None, "comma-separated views to checkpoint (default: every view)")
    keep: int = option(
        3, "complete checkpoints to keep per view (older ones are deleted)", minimum=0
    )
    process_id: int = option(
        0,
        "bytewax cluster: the process whose state directory this is (checkpoints are per "
        "process: each holds the shards that process owns)",
        minimum=0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.checkpoint", __doc__, CheckpointSettings, _checkpoint, argv)


def _checkpoint(settings: CheckpointSettings) -> int:
    views = settings.views.split(",") if settings.views else None
    for w in write_checkpoints(
        Path(settings.state), settings.warehouse, views, settings.process_id, settings.keep
    ):
        print(f"checkpoint {w.checkpoint_id} of view {w.view!r}: {w.shards} shards, {w.bytes:,} B")
    return 0


if __name__ == "__main__":
    exit_command(main())
