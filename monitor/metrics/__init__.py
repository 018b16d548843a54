"""The Prometheus exposition of stored runs."""
