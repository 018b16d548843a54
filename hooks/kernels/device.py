"""Which path a device's tensors take, and the CUDA-only calls of the accelerator path.

The statistics run one of two ways. On the CPU path reading a value costs nothing, so
counts use ``bincount``, temporaries come from reusable scratch buffers and checks read
the numbers right away. On the accelerator path nothing may wait for the device: counts
use fixed-range ``histc``, temporaries are fresh device memory, host constants travel from
pinned memory, and a step's numbers reach the host in one asynchronous copy, read a step
later. Every such choice asks :func:`accelerator_path`, and the CUDA-only calls of that
path (pinned memory, events) are here and nowhere else.

:func:`simulate_accelerator` (tests only) sends CPU tensors down the accelerator path, so
its code runs, and is checked against the same references and for host syncs, on machines
without an accelerator; the CUDA-only calls then fall back to plain host memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

_simulated = False  # the CPU takes the accelerator path (tests only)


def accelerator_path(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the accelerator path (no host syncs, one host copy per step)."""
    return device.type != "cpu" or _simulated


def cuda_kernels(device: torch.device) -> bool:
    """Whether to pick the kernels chosen for CUDA's performance (the simulated accelerator is CUDA)."""
    return device.type == "cuda" or _simulated


@contextlib.contextmanager
def simulate_accelerator(enabled: bool = True) -> Iterator[None]:
    """While inside (tests only), CPU tensors take the accelerator path and the CUDA kernel choices."""
    global _simulated
    previous, _simulated = _simulated, enabled
    try:
        yield
    finally:
        _simulated = previous


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``, from pinned memory on CUDA so the copy does not wait for the device."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy in host memory, started without waiting for the device.

    On the accelerator path this is a step's one documented device-to-host copy: on CUDA
    into pinned memory (from torch's caching host allocator: reused, not re-pinned) with an
    event recorded behind it; :meth:`values` waits on that event, by then long passed."""

    def __init__(self, tensor: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif tensor.device.type == "cpu":
            self._host = tensor  # already host memory (the statistics are fresh tensors: no alias kept alive)
        else:
            self._host = tensor.to("cpu")  # other accelerators: a plain (blocking) copy

    def values(self) -> np.ndarray:
        """The host values as numpy (waits for the copy to land)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()
