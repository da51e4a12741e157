"""docker-compose.yml and the Dockerfile: the compose stack builds the project and runs the flow
against its own Kafka broker."""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from tests.helpers import REPO


def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(compose, dict)
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def command_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def test_kafka_and_flow_services_exist() -> None:
    assert {"kafka", "flow"} <= services().keys()


def test_every_service_has_image_or_build() -> None:
    for name, service in services().items():
        assert "image" in service or "build" in service, name


def test_kafka_is_the_apache_image_with_a_healthcheck() -> None:
    kafka = services()["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka:")
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_flow_waits_for_kafka() -> None:
    depends_on = services()["flow"]["depends_on"]
    assert "kafka" in depends_on
    if isinstance(depends_on, dict):
        assert depends_on["kafka"]["condition"] == "service_healthy"


def test_flow_runs_against_the_compose_broker() -> None:
    all_services = services()
    args = command_args(all_services["flow"])
    assert args[:3] == ["python", "-m", "flows.run"]
    assert args[args.index("--kafka") + 1] == "kafka:9092"
    advertised = all_services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert "PLAINTEXT://kafka:9092" in advertised.split(",")


def test_dockerfile_installs_the_project() -> None:
    dockerfile = REPO / "Dockerfile"
    assert dockerfile.is_file()
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    assert any(line.startswith("FROM python:3.11") for line in lines)
    assert any(line.startswith("COPY . ") for line in lines)
    assert "RUN pip install ." in lines
