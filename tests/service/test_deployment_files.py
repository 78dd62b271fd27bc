"""docker-compose.yml and the Dockerfile, checked by reading (no Docker engine here)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from app.config import Settings
from tests.helpers import PROJECT_ROOT


def compose() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_services_with_health_checks() -> None:
    services = compose()["services"]
    assert {"api", "worker", "gpu-worker", "postgres", "redis"} <= set(services)
    for name in ("api", "worker", "gpu-worker", "postgres", "redis"):
        assert "healthcheck" in services[name], name
    assert services["gpu-worker"]["profiles"] == ["gpu"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "--queues" in services["gpu-worker"]["command"] and "gpu" in services["gpu-worker"]["command"]


def test_compose_variables_are_real_settings() -> None:
    services = compose()["services"]
    known = {f"MODELPRESS_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "gpu-worker"):
        env = services[name]["environment"]
        assert {"MODELPRESS_DATABASE_URL", "MODELPRESS_BROKER_URL", "MODELPRESS_STORAGE_URL"} <= set(env)
        assert {k for k in env if k.startswith("MODELPRESS_")} <= known
        assert env["MODELPRESS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["MODELPRESS_BROKER_URL"].startswith("redis://redis:")
        for dependency in ("postgres", "redis"):
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy"


def test_dockerfile_installs_the_package_and_runs_as_non_root() -> None:
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    for needed in (
        "COPY app",
        "COPY worker",
        "COPY migrations",
        'pip install ".[server,worker]"',  # the bare package is the client only
        "USER modelpress",
        "EXPOSE 8000",
        "bubblewrap",
    ):
        assert needed in text


def test_workers_may_create_their_sandbox_namespaces_and_nothing_else() -> None:
    services = compose()["services"]
    for name in ("worker", "gpu-worker"):
        options = set(services[name]["security_opt"])
        assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= options, name
        assert not services[name].get("privileged"), name
        assert "MODELPRESS_SANDBOX_ISOLATION" not in services[name]["environment"]  # the default: bubblewrap
    assert "security_opt" not in services["api"]  # the API never loads a model file


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    result = subprocess.run(
        ["docker", "compose", "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
