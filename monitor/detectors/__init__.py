"""Detectors run on ingest and turn stored steps into events."""
