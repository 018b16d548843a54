"""Fixtures of the client tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from numwatch.kernels.device import simulate_accelerator


@pytest.fixture(params=["cpu", "accelerator"])
def device_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test on the CPU path and again on the accelerator path (the CPU's tensors sent
    down it by :func:`numwatch.kernels.device.simulate_accelerator`): a module whose
    statistics must hold on both uses it with ``pytestmark = pytest.mark.usefixtures("device_path")``."""
    with simulate_accelerator(request.param == "accelerator"):
        yield request.param


@pytest.fixture
def accelerator_path() -> Iterator[None]:
    """The accelerator path only (sync checks are about that path)."""
    with simulate_accelerator():
        yield
