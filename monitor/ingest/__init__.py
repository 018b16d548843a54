"""Ingest: wire documents validated, stored, and handed to the detectors."""
