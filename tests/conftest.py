"""Shared fixtures: the real Kafka broker that scripts/test starts (scripts/kafka), and fresh
topics on it for integration tests; the real S3 server it starts (scripts/s3), and fresh
warehouse locations on it, local or s3:// (`warehouse_location`, parametrized); projects made
to order (`project_factory`), and a deployment of the catalog definitions (`deployment`). The
markers (kafka, slow) are declared once, in pyproject.toml.

Layout: tests/ mirrors the packages. tests/connectors/, tests/state/ and tests/flows/ hold the
tests of one module of that package each (a module's test may run a command, but what it
checks is that module); tests/e2e/ holds end-to-end and cross-package tests (several commands
in subprocesses, every command's --help and bad input, Kafka, S3, crashes, clusters);
tests/adversarial/ holds bad input, races and failures. No test module stays at the top level:
helpers and oracles shared by several folders are modules here (helpers.py, oracle.py,
vector_oracle.py, serve_helpers.py); each folder is a package, so they import as
`tests.<module>`."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import KafkaException

# The stubs of some confluent-kafka releases do not re-export NewTopic from its documented home.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined, unused-ignore]
from hypothesis import HealthCheck, settings

from tests.helpers import (
    DEFINITIONS,
    DEPLOYMENT_DEFS,
    DEPLOYMENT_EVENTS,
    Project,
    make_events,
    write_module,
)

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


S3_TEST_BUCKET = "featureflow-tests"
S3_DEFAULTS = {  # scripts/s3 env: the loopback test server's endpoint and keys
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9444",
    "AWS_ACCESS_KEY_ID": "featureflow",
    "AWS_SECRET_ACCESS_KEY": "featureflow-secret",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """The S3 server's endpoint (env AWS_ENDPOINT_URL, as `scripts/s3 env` exports it; the
    test server's keys by default); if it is down, fails under CI, else skips."""
    for name, value in S3_DEFAULTS.items():
        os.environ.setdefault(name, value)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        boto3.client("s3", endpoint_url=endpoint).list_buckets()
    except (BotoCoreError, ClientError) as exc:
        message = (
            f"no S3 server answers at {endpoint} (env AWS_ENDPOINT_URL): {exc}; run the tests "
            "with scripts/test, or start one with scripts/s3 start"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return endpoint


@pytest.fixture
def s3_warehouse(s3_endpoint: str) -> str:
    """A fresh, empty s3:// warehouse URI (a unique prefix in the test bucket)."""
    return f"s3://{S3_TEST_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def warehouse_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh warehouse location: a local directory, then an s3:// URI on the test server."""
    if request.param == "local":
        return str(tmp_path / "warehouse")
    return str(request.getfixturevalue("s3_warehouse"))


ProjectFactory = Callable[..., Project]
"""project_factory(name="project", *, partitions=3, topic=None, definitions=None, events=None,
run=False) -> Project"""


@pytest.fixture(scope="session")
def project_factory(tmp_path_factory: pytest.TempPathFactory) -> ProjectFactory:
    """Makes projects, as quix-streams' `app_factory` makes applications: each in a fresh
    folder, with the shared definitions (tests.helpers.DEFINITIONS; or `definitions`, a module's
    text), `events` ingested and, with `run`, the flow run until caught up. Each step it takes
    must succeed. Session-scoped, so module-scoped fixtures can use it too."""

    def make(
        name: str = "project",
        *,
        partitions: int = 3,
        topic: str | None = None,
        definitions: str | None = None,
        events: pa.Table | None = None,
        run: bool = False,
    ) -> Project:
        root = tmp_path_factory.mktemp(name)
        text = DEFINITIONS.format(partitions=partitions, topic=topic)
        project = Project(root, write_module(root / "defs", definitions or text))
        if events is not None:
            succeeded(project.ingest(events))
        if run:
            succeeded(project.run())
        return project

    return make


def succeeded(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def deployment(project_factory: ProjectFactory) -> Path:
    """A deployment of tests.helpers.DEPLOYMENT_DEFS over 3000 events, one per test module:
    <root>/defs/features.py, <root>/wh, <root>/state."""
    events = make_events(DEPLOYMENT_EVENTS, 20, seed=11)
    return project_factory("deployment", definitions=DEPLOYMENT_DEFS, events=events, run=True).root
