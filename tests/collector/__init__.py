"""Tests of the collector (numwatch.monitor)."""
