"""What every server worker process needs to build its app, passed from `flows.serve` to the
worker processes through one environment variable (JSON), since a worker imports the app by name.

The token itself never travels in the environment: each worker reads `token_file`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from flows.errors import ConfigError

CONFIG_ENV = "FEATUREFLOW_SERVE_CONFIG"
BODY_BYTES_PER_ITEM = 4096  # request body allowed per key or row of the batch limit
BODY_BYTES_BASE = 65536


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Settings of one server worker.

    Attributes:
        state: the view store directory (`--state`).
        features: the definitions module that holds the services, None = the deployment's.
        batch_limit: most keys (or service rows) in one request; more is a 413.
        token_file: file holding the bearer token every endpoint but /healthz requires.
        refresh_s: seconds between the client's catch-ups with the writer (FeatureClient's
            `refresh_s`): how stale a read may be, against the time catch-ups take.
        served_log: warehouse to log served reads to (state.servedlog), None = no log.
        served_log_rate: the fraction of reads logged.
    """

    state: str
    features: str | None = None
    batch_limit: int = 1000
    token_file: str | None = None
    refresh_s: float = 0.05
    served_log: str | None = None
    served_log_rate: float = 1.0

    @property
    def max_body_bytes(self) -> int:
        return BODY_BYTES_BASE + BODY_BYTES_PER_ITEM * self.batch_limit

    def to_env(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_env(cls) -> ServeConfig:
        raw = os.environ.get(CONFIG_ENV)
        if raw is None:
            raise ConfigError(
                f"environment variable {CONFIG_ENV} is not set; start the server with "
                "python -m flows.serve, which sets it for its worker processes"
            )
        return cls(**orjson.loads(raw))

    def token(self) -> bytes | None:
        """The bearer token from `token_file` (surrounding whitespace removed), None if none."""
        if self.token_file is None:
            return None
        try:
            token = Path(self.token_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"--token-file {self.token_file!r} cannot be read ({exc}); give a readable "
                "file holding the token"
            ) from exc
        if not token:
            raise ConfigError(
                f"--token-file {self.token_file!r} is empty; put the bearer token in it"
            )
        return token
