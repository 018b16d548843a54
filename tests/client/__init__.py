"""Tests of the training-side client (numwatch)."""
