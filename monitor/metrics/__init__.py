"""What the collector hands the monitoring stack: the Prometheus exposition of stored runs,
and its events as Grafana annotations."""
