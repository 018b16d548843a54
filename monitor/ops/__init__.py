"""Operations: the command line, the local stack, the demo and Grafana provisioning."""
