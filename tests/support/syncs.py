"""Records every operation that makes an accelerator wait for the host (a host sync).

On a GPU the host queues kernels and runs ahead; an op whose result the host must see
(``.item()``, ``float()``, ``bool()``), whose output size depends on the data (``nonzero``,
``masked_select``, boolean-mask indexing, ``unique``, ``repeat_interleave`` without
``output_size``, ``bincount``, ``histc`` of an unknown range), and a blocking copy between
host and device stop it until the device has caught up. :class:`SyncRecorder` sees them as
they are dispatched (a ``TorchDispatchMode``), and the host-side reads that dispatch nothing
on a CPU tensor (``.tolist()``, ``.numpy()``, ``.cpu()``, a ``.to(device)`` that may block)
through a ``TorchFunctionMode``.

A tensor counts as on the device when it is on an accelerator, or on the CPU while
:func:`numwatch.kernels.device.simulate_accelerator` sends the CPU down the accelerator
path: then every tensor is a device tensor, and the only host memory is what
:class:`numwatch.kernels.device.HostCopy` (a step's one documented device-to-host copy)
makes. What that class does is not recorded; the copies it makes are counted instead.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import CodeType, FrameType, TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from numwatch.kernels.device import HostCopy, accelerator_path

aten = torch.ops.aten
_TORCH_DIR = os.path.dirname(torch.__file__)

# Ops that stop the host whatever their arguments: a value read, or an output sized by the data.
_ALWAYS: dict[Any, str] = {
    aten._local_scalar_dense.default: "item",
    aten.is_nonzero.default: "item",
    aten.equal.default: "item",
    aten.nonzero.default: "nonzero",
    aten.nonzero.out: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim_consecutive.default: "unique",
    aten.bincount.default: "bincount",
}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}
# Host reads of a tensor's values that dispatch nothing on the CPU.
_HOST_READS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "copy to host"}
_FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}


@dataclass(frozen=True)
class Sync:
    """One op that makes the device wait for the host: what, which op, and the code that ran it."""

    kind: str
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.op}) at {self.where}"


def _on_device(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and accelerator_path(value.device)


def _tensors(values: Sequence[Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_tensors(value))
    return found


def _named_device(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a ``.to(...)``/factory call names a device (positionally or as ``device=``)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor)) for a in args)


class SyncRecorder:
    """``with SyncRecorder() as recorder:`` records the host syncs in ``recorder.syncs`` and
    counts the documented host copies in ``recorder.host_copies``."""

    def __init__(self) -> None:
        self.syncs: list[Sync] = []
        self.host_copies = 0
        self._exempt: set[CodeType] = {HostCopy.__init__.__code__, HostCopy.values.__code__}
        self._modes = (_Dispatch(self), _Functions(self))
        self._original_init: Callable[..., None] | None = None

    def __enter__(self) -> SyncRecorder:
        original = self._original_init = HostCopy.__init__

        def counted(copy: HostCopy, tensor: torch.Tensor) -> None:
            self.host_copies += 1
            original(copy, tensor)

        HostCopy.__init__ = counted  # type: ignore[method-assign]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(exc_type, exc, traceback)
        HostCopy.__init__ = self._original_init  # type: ignore[method-assign]

    def kinds(self) -> collections.Counter[str]:
        return collections.Counter(sync.kind for sync in self.syncs)

    def record(self, kind: str, op: Any) -> None:
        frame: FrameType | None = sys._getframe(2)
        where = None
        while frame is not None:
            if frame.f_code in self._exempt:
                return  # the documented copy and its read
            filename = frame.f_code.co_filename
            if where is None and not filename.startswith(_TORCH_DIR) and filename != __file__:
                where = f"{os.path.relpath(filename)}:{frame.f_lineno} {frame.f_code.co_name}"
            frame = frame.f_back
        self.syncs.append(Sync(kind, str(getattr(op, "__name__", op)), where or "?"))


class _Recording:
    """What both modes do with each call: record it when it is a sync, then run it."""

    def __init__(self, recorder: SyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def _record_and_run(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any] | None) -> Any:
        kwargs = kwargs or {}
        kind = self._sync_kind(func, args, kwargs)
        if kind is not None:
            self.recorder.record(kind, func)
        return func(*args, **kwargs)

    @staticmethod
    def _sync_kind(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        raise NotImplementedError


class _Dispatch(_Recording, TorchDispatchMode):
    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        return self._record_and_run(func, args, kwargs)

    @staticmethod
    def _sync_kind(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        tensors = _tensors(list(args) + list(kwargs.values()))
        if func in _COPIES:
            return _copy_kind(func, args, kwargs)
        if not any(_on_device(t) for t in tensors):
            return None
        if func in _ALWAYS:
            return _ALWAYS[func]
        if func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None and len(args) < 3:
            return "repeat_interleave"
        if func in _INDEXING and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2])):
            return "boolean-mask index"
        if func is aten.histc.default and _histc_range(args, kwargs) is None:
            return "histc of an unknown range"
        return None


def _histc_range(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[float, float] | None:
    low = args[2] if len(args) > 2 else kwargs.get("min", 0)
    high = args[3] if len(args) > 3 else kwargs.get("max", 0)
    return None if low == high else (low, high)


def _copy_kind(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """A copy between real devices: to the host always syncs (into pageable memory, or to be
    read); to the device when it is not ``non_blocking``."""
    if func is aten.copy_.default:
        destination, source = args[0].device, args[1].device
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
    else:
        source = args[0].device
        destination = kwargs.get("device") or source
        non_blocking = bool(kwargs.get("non_blocking", False))
    if source.type == destination.type:
        return None
    if destination.type == "cpu":
        return "copy to host"
    return None if non_blocking else "blocking copy to the device"


class _Functions(_Recording, TorchFunctionMode):
    """Host reads that dispatch nothing on a CPU tensor, and transfers that may block."""

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        return self._record_and_run(func, args, kwargs)

    @staticmethod
    def _sync_kind(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        simulated = accelerator_path(torch.device("cpu"))
        if func in _FACTORIES_FROM_DATA and kwargs.get("device") is not None:
            device = torch.device(kwargs["device"])
            return "blocking copy to the device" if accelerator_path(device) else None
        if not simulated or not args or not _on_device(args[0]):
            return None  # on a real device, the dispatched copies tell
        if func in _HOST_READS:
            return _HOST_READS[func]
        if func is torch.Tensor.to and _named_device(args[1:], kwargs) and not kwargs.get("non_blocking"):
            return "transfer that may block"
        return None
