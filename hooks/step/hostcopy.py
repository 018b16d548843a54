"""One step's device statistics to host memory in one non-blocking copy.

Every statistic of a step is added as a named part; :meth:`DeviceStack.to_host` lays
them out in ONE float64 device tensor (floats widened, which is exact for float32 and
float64; int64 parts reinterpreted bit for bit with ``Tensor.view``) and starts ONE
non-blocking copy into host memory (:class:`numwatch.kernels.device.HostCopy`: pinned on
CUDA, with an event to know when it landed). Nothing here waits on the device:
:meth:`HostStack.wait` does, later, when the copy has long finished (next step or the
sender thread). On the CPU path the statistics are host memory already: each is copied as
it is (a snapshot, as the packed copy is) and read without packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from numwatch.kernels.device import HostCopy, accelerator_path

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
    """Named device tensors of one step, gathered for a single host copy.

    ``add`` only records; :meth:`to_host` packs everything with a few ops per dtype (one
    ``_chunk_cat`` of the tensors, one ``stack`` of the scalars, one widening), so the ops
    per step do not grow with the number of statistics."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._owned: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor, owned: bool = False) -> None:
        """Add a device tensor (any float or integer dtype; read back as float32/float64 or int64).
        ``owned``: made for this step and written by nothing after (the CPU path need not copy it)."""
        if owned:
            self._owned.add(name)
        if name in self._tensors:
            raise ValueError(f"statistic {name!r} added twice")
        if tensor.dtype not in _FLOAT_KINDS and tensor.dtype not in _INT_KINDS:
            raise TypeError(f"statistic {name!r} has unsupported dtype {tensor.dtype}")
        self._tensors[name] = tensor.detach() if tensor.requires_grad else tensor

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def to_host(self) -> HostStack:
        """Start the one device-to-host copy; the result is read with :meth:`HostStack.wait`."""
        parts: dict[str, _Part] = {}
        if not self._tensors:
            return HostStack(parts, np.zeros(0))
        device = next(iter(self._tensors.values())).device
        if not accelerator_path(device):
            # Host memory already: a copy of each (some alias live state, such as the GradScaler's
            # scale) is fewer ops than packing them, for the few statistics of a regular step.
            owned = self._owned
            copies = {name: tensor if name in owned else tensor.clone() for name, tensor in self._tensors.items()}
            return HostStack(parts, np.zeros(0), copies)
        by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in self._tensors.items():
            by_dtype.setdefault(tensor.dtype, []).append((name, tensor.to(device, non_blocking=True)))
        blocks: list[torch.Tensor] = []
        length = 0
        for dtype, named in by_dtype.items():
            # Laid out as: the scalars (one stack), then the arrays (one _chunk_cat, which
            # refuses empty tensors: they take no room anyway).
            scalars = [(name, t) for name, t in named if t.dim() == 0]
            arrays = [(name, t) for name, t in named if t.dim() > 0]
            pieces = [torch.stack([t for _, t in scalars])] if scalars else []
            filled = [t for _, t in arrays if t.numel()]
            if filled:
                pieces.append(torch._chunk_cat(filled, 0, 1)[0])
            for name, tensor in scalars + arrays:
                parts[name] = _Part(name, dtype in _INT_KINDS, tuple(tensor.shape), length, length + tensor.numel())
                length += tensor.numel()
            if pieces:
                block = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                blocks.append(
                    block.to(torch.int64).view(torch.float64) if dtype in _INT_KINDS else block.to(torch.float64)
                )
        stacked = (
            blocks[0]
            if len(blocks) == 1
            else torch.cat(blocks)
            if blocks
            else torch.zeros(0, dtype=torch.float64, device=device)
        )
        return HostStack(parts, HostCopy(stacked))


class HostStack:
    """The host side of a :class:`DeviceStack`: named numpy arrays once the copy has landed."""

    def __init__(
        self, parts: dict[str, _Part], host: HostCopy | np.ndarray, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        self._parts = parts
        self._host = host
        self._values: np.ndarray | None = None
        # CPU path: copies of the statistics, read as they are.
        self._tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in (self._parts if self._tensors is None else self._tensors)

    def names(self) -> list[str]:
        """Names of the statistics held, in the order they were added."""
        return list(self._parts if self._tensors is None else self._tensors)

    def wait(self) -> None:
        """Wait until the copy has landed (it was started a step ago, so this rarely waits)."""
        if self._values is None:
            self._values = self._host.values() if isinstance(self._host, HostCopy) else self._host

    def get(self, name: str, dtype: str | None = None) -> np.ndarray:
        """The statistic ``name`` with its original shape, as float64 or int64, or cast to
        ``dtype`` (e.g. a protocol array dtype such as '<f4')."""
        if self._tensors is not None:
            array = _as_numpy(self._tensors[name])
        else:
            self.wait()
            part = self._parts[name]
            assert self._values is not None
            raw = self._values[part.start : part.stop]
            array = (raw.view(np.int64) if part.is_int else raw).reshape(part.shape)
        return array.astype(dtype) if dtype is not None else array

    def scalar(self, name: str) -> float:
        """A one-element float statistic as a Python float."""
        if self._tensors is not None:
            return float(self._tensors[name].item())
        return float(self.get(name).reshape(-1)[0])


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU statistic as float64 or int64 numpy, as :meth:`HostStack.get` gives every statistic."""
    if tensor.dtype in _INT_KINDS:
        return tensor.numpy().astype(np.int64, copy=False)
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.double()  # numpy has no bfloat16
    return tensor.numpy().astype(np.float64, copy=False)
