"""Deploy configuration: Prometheus/Alertmanager configs pass their own checkers, and
docker-compose, the Dockerfile and Grafana provisioning agree with each other."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from numwatch.monitor.ops import grafana
from tests.support.binaries import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _container_port(service: str) -> int:
    """The container side of the service's single published port."""
    (mapping,) = SERVICES[service]["ports"]
    return int(str(mapping).rsplit(":", 1)[1])


def _mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (named volumes skipped)."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            mounts[container] = (DEPLOY / host).resolve()
    return mounts


def _flag(service: str, name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in SERVICES[service]["command"] if arg.startswith(f"--{name}=")]
    return value


def _host_path(service: str, container_path: str) -> Path:
    """Where ``container_path`` of ``service`` comes from on the host, through its bind mounts."""
    for target, host in sorted(_mounts(service).items(), key=lambda item: -len(item[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return host / Path(container_path).relative_to(target)
    raise AssertionError(f"{container_path} is not mounted into {service}")


def _check(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.binaries
def test_promtool_check_config_with_rule_files() -> None:
    _check(require_binary("promtool"), "check", "config", str(PROMETHEUS_YML))


@pytest.mark.binaries
def test_amtool_check_config() -> None:
    _check(require_binary("amtool"), "check-config", str(ALERTMANAGER_YML))


def test_alertmanager_routes_by_severity_and_groups_by_run() -> None:
    config = _load(ALERTMANAGER_YML)
    assert {"run", "alertname"} <= set(config["route"]["group_by"])
    routes = {tuple(route["matchers"]): route["receiver"] for route in config["route"]["routes"]}
    assert routes[('severity="critical"',)] == "pager"
    assert routes[('severity="warning"',)] == "chat"
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    for name in ("pager", "chat"):
        assert urlsplit(receivers[name]["webhook_configs"][0]["url"]).scheme in {"http", "https"}


def test_every_bind_mount_exists() -> None:
    for service in SERVICES:
        for container, host in _mounts(service).items():
            assert host.exists(), f"{service}: {host} (for {container}) does not exist"


def test_prometheus_scrapes_collector_and_alerts_alertmanager() -> None:
    config = _load(_host_path("prometheus", _flag("prometheus", "config.file")))
    (numwatch_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "numwatch"]
    assert numwatch_job["metrics_path"] == "/metrics"
    assert numwatch_job["static_configs"][0]["targets"] == [f"collector:{_container_port('collector')}"]
    (alertmanager,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager == f"alertmanager:{_container_port('alertmanager')}"
    assert _flag("alertmanager", "web.listen-address").endswith(f":{_container_port('alertmanager')}")
    assert _flag("prometheus", "web.listen-address").endswith(f":{_container_port('prometheus')}")
    config_dir = Path(_flag("prometheus", "config.file")).parent
    for rule_file in config["rule_files"]:
        assert _host_path("prometheus", str(config_dir / rule_file)).is_file()
    assert config["global"]["external_labels"]["grafana_url"] == f"http://localhost:{_container_port('grafana')}"


def test_alertmanager_uses_the_repository_config() -> None:
    assert _host_path("alertmanager", _flag("alertmanager", "config.file")) == ALERTMANAGER_YML


def test_collector_uses_postgres_service() -> None:
    collector = SERVICES["collector"]
    url = urlsplit(collector["environment"]["NUMWATCH_DATABASE_URL"])
    assert url.scheme == "postgresql+psycopg"
    assert url.hostname == "postgres" and url.port == 5432
    postgres_env = SERVICES["postgres"]["environment"]
    assert url.username == postgres_env["POSTGRES_USER"] and url.path == f"/{postgres_env['POSTGRES_DB']}"
    assert collector["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_collector_image_builds_from_the_repository() -> None:
    build = SERVICES["collector"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    dockerfile = (context / build["dockerfile"]).read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            # README.md is declared by pyproject (the build needs it); everything else must exist.
            assert (context / source).exists() or source == pyproject["project"]["readme"], source
    assert f"EXPOSE {_container_port('collector')}" in dockerfile
    assert re.search(r"numwatch serve --host 0\.0\.0\.0 --port " + str(_container_port("collector")), dockerfile)
    assert 'pip install ".[server]"' in dockerfile and "server" in pyproject["project"]["optional-dependencies"]
    # Every folder the package is built from is copied, and the collector image carries no torch.
    copied = {
        source.rstrip("/")
        for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.MULTILINE)
        for source in line.split()[:-1]
    }
    assert set(pyproject["tool"]["setuptools"]["package-dir"].values()) <= copied
    installed = [
        token.strip("\"'") for args in re.findall(r"pip install ([^&\n]+)", dockerfile) for token in args.split()
    ]
    assert installed and not [token for token in installed if token.startswith("torch")]


def test_grafana_installs_infinity_and_provisions_both_datasources() -> None:
    grafana_service = SERVICES["grafana"]
    assert "yesoreyeram-infinity-datasource" in grafana_service["environment"]["GF_INSTALL_PLUGINS"].split(",")
    provisioning = _host_path("grafana", "/etc/grafana/provisioning")
    datasources = {ds["uid"]: ds for ds in _load(provisioning / "datasources" / "numwatch.yml")["datasources"]}
    prometheus_url = f"http://prometheus:{_container_port('prometheus')}"
    collector_url = f"http://collector:{_container_port('collector')}"
    # The API push (numwatch.monitor.ops.grafana) and the file provisioning define the same datasources.
    for model in grafana.datasource_models(prometheus_url, collector_url, collector_token="t"):
        provisioned = datasources[model["uid"]]
        for key in ("name", "type", "url", "access", "isDefault"):
            assert provisioned[key] == model[key], (model["uid"], key)
        assert provisioned["jsonData"] == model["jsonData"]
    token_variable = datasources["numwatch-collector"]["secureJsonData"]["bearerToken"].lstrip("$").strip("{}")
    assert token_variable in grafana_service["environment"]


def test_grafana_dashboard_provider_reads_the_mounted_dashboards() -> None:
    provisioning = _host_path("grafana", "/etc/grafana/provisioning")
    (provider,) = _load(provisioning / "dashboards" / "numwatch.yml")["providers"]
    assert provider["type"] == "file"
    dashboards = _host_path("grafana", provider["options"]["path"])
    assert dashboards == ROOT / "dashboards"
    assert {"numwatch-overview.json", "numwatch-run.json"} <= {path.name for path in dashboards.glob("*.json")}


def test_compose_dependencies_name_real_services() -> None:
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in COMPOSE["volumes"], f"{name} mounts undeclared volume {source}"


@pytest.mark.binaries
@pytest.mark.parametrize(
    "labels, receiver",
    [
        (["alertname=NumwatchNonFiniteGradients", "severity=critical", "run=r1"], "pager"),
        (["alertname=NumwatchCollectorDown", "severity=critical"], "pager"),
        (["alertname=NumwatchUnderflowHigh", "severity=warning", "run=r1"], "chat"),
    ],
)
def test_alertmanager_routes_alerts_to_receivers(labels: list[str], receiver: str) -> None:
    """amtool resolves the receiver an alert with ``labels`` is routed to."""
    argv = [
        require_binary("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_YML}",
        f"--verify.receivers={receiver}",
        *labels,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver
