"""The collector's HTTP routers, one per resource."""
