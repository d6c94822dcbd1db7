"""Dockerfile and docker-compose.yml stay consistent with the code (no Docker engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _settings_env_names() -> set[str]:
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif alias is not None:
            names.update(str(choice) for choice in alias.choices)
    return names


def test_compose_passes_docker_compose_config():
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose (Debian package) is not installed; .ci/run installs it")
    env = os.environ | {"MODELPRESS_ADMIN_KEY": "x" * 32}
    subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], check=True, env=env, cwd=ROOT)
    subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"], check=True, env=env, cwd=ROOT)
    missing_key = {k: v for k, v in env.items() if k != "MODELPRESS_ADMIN_KEY"}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env=missing_key, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "MODELPRESS_ADMIN_KEY" in result.stderr


def test_compose_services_and_environment_match_the_code():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"api", "migrate", "worker", "gpu-worker", "redis", "postgres", "minio"} <= set(services)
    known = _settings_env_names() | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "CUDA_VISIBLE_DEVICES"}
    for name in ("api", "migrate", "worker", "gpu-worker"):
        env = services[name]["environment"]
        assert not set(env) - known, f"{name} sets unknown variables {set(env) - known}"
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"
    assert "modelpress.jobs.gpu" in services["gpu-worker"]["command"]
    assert services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    worker_queues = services["worker"]["command"][services["worker"]["command"].index("-Q") + 1]
    assert set(worker_queues.split(",")) == {"modelpress.jobs", "modelpress.inspect"}


def test_dockerfile_has_a_torch_free_api_target_and_a_worker_target():
    text = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", text, re.MULTILINE | re.DOTALL))
    assert {"base", "api", "worker"} <= set(stages)
    assert "torch" not in stages["api"] and "torch" not in stages["base"]
    assert "torch==2.14.1" in stages["worker"]
    assert "uvicorn" in stages["api"] and "celery" in stages["worker"]
