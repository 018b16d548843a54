"""One step's device statistics to host memory in one non-blocking copy.

Every statistic of a step is added as a named part; :meth:`DeviceStack.to_host` lays
them out in ONE float64 device tensor (floats widened, which is exact for float32 and
float64; int64 parts reinterpreted bit for bit with ``Tensor.view``) and starts ONE
non-blocking copy into (pinned, on CUDA) host memory, with a CUDA event to know when it
landed. Nothing here waits on the device: :meth:`HostStack.wait` does, later, when the
copy has long finished (next step or the sender thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_FLOAT_KINDS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_INT_KINDS = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


@dataclass(frozen=True)
class _Part:
    name: str
    is_int: bool
    shape: tuple[int, ...]
    start: int
    stop: int


class DeviceStack:
    """Named device tensors of one step, gathered for a single host copy."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._parts: dict[str, _Part] = {}
        self._length = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add a device tensor (any float or integer dtype; read back as float32/float64 or int64)."""
        if name in self._parts:
            raise ValueError(f"statistic {name!r} added twice")
        tensor = tensor.detach()
        if tensor.dtype in _FLOAT_KINDS:
            flat, is_int = tensor.reshape(-1).to(torch.float64), False
        elif tensor.dtype in _INT_KINDS:
            flat, is_int = tensor.reshape(-1).to(torch.int64).view(torch.float64), True
        else:
            raise TypeError(f"statistic {name!r} has unsupported dtype {tensor.dtype}")
        self._parts[name] = _Part(name, is_int, tuple(tensor.shape), self._length, self._length + flat.numel())
        self._tensors.append(flat)
        self._length += flat.numel()

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def to_host(self) -> HostStack:
        """Start the one device-to-host copy; the result is read with :meth:`HostStack.wait`."""
        if not self._tensors:
            return HostStack(self._parts, np.zeros(0), None)
        device = self._tensors[0].device
        stacked = torch.cat([t.to(device, non_blocking=True) for t in self._tensors])
        if device.type == "cuda":
            # Pinned blocks come from torch's caching host allocator: reused, not re-pinned.
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return HostStack(self._parts, host, event)
        # CPU: a plain copy (cat already made fresh memory). Other accelerators copy synchronously.
        return HostStack(self._parts, stacked.to("cpu"), None)


class HostStack:
    """The host side of a :class:`DeviceStack`: named numpy arrays once the copy has landed."""

    def __init__(self, parts: dict[str, _Part], host: torch.Tensor | np.ndarray, event: object | None) -> None:
        self._parts = parts
        self._host = host
        self._event = event
        self._values: np.ndarray | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def names(self) -> list[str]:
        """Names of the statistics held, in the order they were added."""
        return list(self._parts)

    def wait(self) -> None:
        """Wait until the copy has landed (it was started a step ago, so this rarely waits)."""
        if self._values is not None:
            return
        if self._event is not None:
            self._event.synchronize()  # type: ignore[attr-defined]
        host = self._host
        self._values = host.numpy() if isinstance(host, torch.Tensor) else host

    def get(self, name: str, dtype: str | None = None) -> np.ndarray:
        """The statistic ``name`` with its original shape, as float64 or int64, or cast to
        ``dtype`` (e.g. a protocol array dtype such as '<f4')."""
        self.wait()
        part = self._parts[name]
        assert self._values is not None
        raw = self._values[part.start : part.stop]
        array = raw.view(np.int64) if part.is_int else raw
        array = array.reshape(part.shape)
        return array.astype(dtype) if dtype is not None else array

    def scalar(self, name: str) -> float:
        """A one-element float statistic as a Python float."""
        return float(self.get(name).reshape(-1)[0])
