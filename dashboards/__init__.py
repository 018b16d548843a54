"""Grafana dashboard JSON shipped as package data (``importlib.resources.files("numwatch.dashboards")``);
``generate.py`` writes them."""
