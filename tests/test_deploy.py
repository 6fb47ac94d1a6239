"""The Docker deployment, checked without a Docker engine (none runs in CI): docker-compose.yml
against the Compose Specification's JSON schema (vendored by check-jsonschema) and against the
structure the README promises; the Dockerfile and .dockerignore."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import pytest
import yaml

from service.testing import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
APP_SERVICES = ("migrate", "api", "worker", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_file_matches_the_compose_schema(compose: dict[str, Any]) -> None:
    pytest.importorskip("check_jsonschema")
    import jsonschema

    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_references_resolve(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes") or []:
            default = re.fullmatch(r"\$\{DATA_DIR:-([\w-]+)\}:/data", mount)  # the default of DATA_DIR
            source = default.group(1) if default else mount.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"


def test_data_and_redis_are_on_writable_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in APP_SERVICES:
        (mount,) = services[name]["volumes"]
        assert mount == "${DATA_DIR:-data}:/data", name  # a named volume by default, not root-owned ./data
    assert any(m.endswith(":/data") for m in services["redis"]["volumes"])  # --appendonly needs it kept
    assert "--appendonly" in services["redis"]["command"]


def test_only_the_api_has_an_http_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "healthz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("worker", "worker-gpu"):
        check = " ".join(services[name]["healthcheck"]["test"])
        assert "ping()" in check and "http" not in check, name
    assert "HEALTHCHECK" not in (REPO_ROOT / "Dockerfile").read_text().replace("# No HEALTHCHECK", "")


def test_cpu_and_gpu_images_have_their_own_tags(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {services[n]["image"] for n in ("migrate", "api", "worker")} == {"attribution-service:cpu"}
    gpu = services["worker-gpu"]
    assert gpu["image"] == "attribution-service:gpu" and "cu" in gpu["build"]["args"]["TORCH_INDEX"]
    assert gpu["environment"]["DEVICE"] == "cuda" and gpu["environment"]["REDIS_URL"]


def test_auth_key_is_required_and_monitoring_is_a_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["environment"]["API_KEYS"].startswith("${API_KEYS:?")
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
    assert services["worker-gpu"]["profiles"] == ["gpu"]


def test_build_context_excludes_the_venv_and_copies_every_package() -> None:
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "data"} <= ignored
    copied = re.findall(r"^COPY (\S+)", (REPO_ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    for source in copied:
        assert source not in ignored and (REPO_ROOT / source).exists(), source
    for package in ("attribution", "attribution_client", "loading", "service", "workers", "migrations"):
        assert package in copied, package
