"""The HTTP API: dependencies, the error handlers, middleware and routes."""
