"""Shared fixtures: the real Kafka broker that scripts/test starts (scripts/kafka), and fresh
topics on it for integration tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import KafkaException
from hypothesis import HealthCheck, settings

# The stubs of some confluent-kafka releases do not re-export NewTopic from its documented home.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined, unused-ignore]

# Property tests: random exploration on developers' machines, reproducible in CI (derandomized,
# no example database, no deadline: a slow shared runner must not turn into a failure).
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

TopicFactory = Callable[[int], str]
"""Creates a fresh topic with the given number of partitions and returns its name."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kafka: needs the real Kafka broker started by scripts/kafka"
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The broker's address (env KAFKA_BOOTSTRAP); if it is down, fails under CI, else skips."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    try:
        brokers = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).brokers
    except KafkaException:
        brokers = {}
    if not brokers:
        message = (
            f"no Kafka broker answers at {bootstrap} (env KAFKA_BOOTSTRAP); "
            "run the tests with scripts/test, or start one with scripts/kafka start"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return bootstrap


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """A factory of uniquely named topics, deleted when the test ends."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def create(partitions: int) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        topic = NewTopic(name, num_partitions=partitions, replication_factor=1)
        admin.create_topics([topic], operation_timeout=10)[name].result(timeout=15)
        created.append(name)
        return name

    yield create
    if created:
        for future in admin.delete_topics(created, operation_timeout=10).values():
            future.result(timeout=15)
