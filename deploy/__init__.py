"""Deployment configuration shipped as package data: Prometheus scrape config and alert rules (with their
promtool tests), Alertmanager routing, Grafana provisioning, the compose file. Read with
``importlib.resources.files("numwatch.deploy")``."""
