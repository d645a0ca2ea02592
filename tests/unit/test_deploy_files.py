"""compose.yaml, the Prometheus config and the dashboard agree with the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

import consumer.metrics
import outbox_relay.metrics
from tests.conftest import ROOT

REPLICATED = {"api": 2, "relay": 2, "consumer": 3}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_replicated_services_can_be_scaled() -> None:
    services = compose()["services"]

    for name, replicas in REPLICATED.items():
        service = services[name]
        # docker-compose 1.29 reads scale, Compose v2 either; both must agree.
        assert service["scale"] == service["deploy"]["replicas"] == replicas
        assert "container_name" not in service
        assert "ports" not in service, f"{name} publishes a fixed host port"


def test_the_api_is_published_through_the_load_balancer_only() -> None:
    services = compose()["services"]

    assert services["loadbalancer"]["image"].startswith("nginx:")
    assert any(":8000" in port for port in services["loadbalancer"]["ports"])
    assert services["grafana"]["ports"] == ["127.0.0.1:${GRAFANA_PORT:-3000}:3000"]
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?")


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose not installed"
)
def test_compose_config_is_valid() -> None:
    done = subprocess.run(
        ["docker-compose", "-f", "compose.yaml", "config", "-q"],
        cwd=ROOT,
        env={
            **os.environ,
            "POSTGRES_PASSWORD": "x",
            "RABBITMQ_PASSWORD": "y",
            "GRAFANA_ADMIN_PASSWORD": "z",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr


def test_prometheus_scrapes_each_replicated_service() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    assert set(jobs) == set(REPLICATED)
    ports = {name: jobs[name]["dns_sd_configs"][0]["port"] for name in jobs}
    assert ports == {"api": 8000, "relay": 8081, "consumer": 8082}


def _exposed_names() -> set[str]:
    """Sample names the relay and consumer metrics expose, plus the API's."""
    names = set()
    for module in (outbox_relay.metrics, consumer.metrics):
        for value in vars(module).values():
            if hasattr(value, "_name") and hasattr(value, "collect"):
                for family in value.collect():
                    names.update(sample.name for sample in family.samples)
                    names.add(family.name)
    names.update(
        {
            "outbox_tasks_api_requests_total",
            "outbox_tasks_api_request_duration_seconds_bucket",
        }
    )
    return names


def test_every_metric_on_the_dashboard_is_exposed() -> None:
    dashboard = json.loads(
        (ROOT / "deploy" / "grafana" / "dashboards" / "outbox.json").read_text()
    )
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    used = {
        name
        for expr in expressions
        for name in re.findall(r"\b((?:outbox|consumer)_[a-z_]+)\b", expr)
    }
    # Histograms and counters only expose their samples after a first
    # observation with labels; make sure each labelled family has one.
    outbox_relay.metrics.PUBLISHED.labels(routing_key="x")
    outbox_relay.metrics.RETURNED.labels(routing_key="x")
    outbox_relay.metrics.FAILED.labels(reason="x")
    consumer.metrics.PROCESSED.labels(outcome="x")
    consumer.metrics.DEAD_LETTERED.labels(reason="x")
    consumer.metrics.HANDLER_DURATION.labels(task_type="x")
    consumer.metrics.END_TO_END.labels(status="x")

    assert used, "no metric found in the dashboard"
    assert used <= _exposed_names(), used - _exposed_names()


def test_counters_follow_the_prometheus_naming_conventions() -> None:
    for module in (outbox_relay.metrics, consumer.metrics):
        for value in vars(module).values():
            if not (hasattr(value, "_name") and hasattr(value, "_type")):
                continue
            name = value._name
            assert not name.endswith("_total"), "the client adds _total itself"
            if value._type == "histogram":
                # A unit: time, or what a batch counts.
                assert name.endswith(("_seconds", "_deliveries")), name
