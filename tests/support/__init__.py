"""Helpers the tests share: servers, browsers, documents, small models."""
