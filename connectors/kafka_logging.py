"""The one log of every Kafka client in `connectors` (reader, producers, admin): librdkafka's
own lines come here (each client's `logger` setting), not to stderr, rate-limited so that a broker
outage does not flood it.

    Consumer / Producer / AdminClient --"logger"--> KAFKA_LOG --RateLimitFilter--> handlers
                                                     (logger "connectors.kafka")

The logger's name stays `connectors.kafka`, the name logging configurations know it by.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time

__all__ = ["KAFKA_LOG", "RateLimitFilter"]

KAFKA_LOG = logging.getLogger("connectors.kafka")
_DIGITS = re.compile(r"\d+")


class RateLimitFilter(logging.Filter):
    """Lets one log line per distinct message through every `interval_s` seconds (messages that
    differ only in numbers count as one); the next line let through says how many like it were
    suppressed. librdkafka repeats a failing connect ~20 times a second per client during a
    broker outage."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (time let through, suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = _DIGITS.sub("#", record.getMessage()), time.monotonic()
        with self._lock:
            since, suppressed = self._seen.get(key, (-math.inf, 0))
            if now - since < self.interval_s:
                self._seen[key] = (since, suppressed + 1)
                return False
            if len(self._seen) > 1000:  # forget messages that went quiet
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
            self._seen[key] = (now, 0)
        if suppressed:
            record.msg = (
                f"{record.getMessage()} ({suppressed} more like it in the last "
                f"{now - since:.0f} s suppressed)"
            )
            record.args = ()
        return True


KAFKA_LOG.addFilter(RateLimitFilter())
