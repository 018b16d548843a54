"""`numwatch stack`'s configs: deploy/'s files with loopback addresses, still valid for the real tools."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import yaml

from numwatch.monitor.ops import stack
from tests.support.binaries import require_binary


def test_prometheus_config_rewrites_addresses_and_keeps_rules(tmp_path: Path) -> None:
    config = stack.prometheus_config(
        "127.0.0.1:18428", "127.0.0.1:19093", interval="2s", self_address="127.0.0.1:19090"
    )
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["numwatch"]["static_configs"] == [{"targets": ["127.0.0.1:18428"]}]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:19090"]}]
    assert config["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["127.0.0.1:19093"]}]
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "2s"
    assert config["rule_files"] == [str(stack.DEPLOY_DIR / "prometheus" / "rules" / "numwatch.rules.yml")]
    # The shipped file itself is untouched (the rewrite works on a copy).
    assert yaml.safe_load((stack.DEPLOY_DIR / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0][
        "static_configs"
    ] == [{"targets": ["collector:8428"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([require_binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_redirects_every_receiver(tmp_path: Path) -> None:
    config = stack.alertmanager_config("http://127.0.0.1:5001/hook")
    assert config["receivers"], "deploy's alertmanager.yml has receivers"
    for receiver in config["receivers"]:
        assert receiver["webhook_configs"] == [{"url": "http://127.0.0.1:5001/hook", "send_resolved": True}]
    silent = stack.alertmanager_config(None)
    assert all("webhook_configs" not in receiver for receiver in silent["receivers"])
    assert silent["route"] == config["route"]
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([require_binary("amtool"), "check-config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stack_without_binaries_says_how_to_install(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    args = argparse.Namespace(workdir=str(tmp_path / "w"))
    assert stack.run_stack(args) == 2
    err = capsys.readouterr().err
    assert "not found on PATH" in err and "apt-get install prometheus prometheus-alertmanager" in err
