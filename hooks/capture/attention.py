"""Max attention logit per attention call, taken where the attention is computed.

The pre-softmax logits ``scale * q @ k^T`` of every call to
``torch.nn.functional.scaled_dot_product_attention`` are seen by a ``TorchFunctionMode``,
so it does not matter how the model imported the function (``F.scaled_dot_product_attention``,
``from torch.nn.functional import scaled_dot_product_attention``, Hugging Face's sdpa
attention, ``nn.MultiheadAttention`` without weights). The mode is entered only for the
forwards of sampled steps; on other steps nothing is intercepted.

Each call's maximum over batch, heads and unmasked positions is computed in float32 (or
the inputs' wider dtype) when the forward ends, for all calls alike in shapes and arguments
at once (their q and k stacked: the ops per forward do not grow with the number of layers),
in chunks of query rows, so at most ``chunk_elements`` logits exist
at a time, never the whole B x H x T x T matrix; a causal call skips the keys no row of the
chunk can see. Everything stays on the device (no host sync): the maxima join the step's
single host copy. Attention written by hand (``softmax(q @ k.T)``) is not seen unless it
reports itself with :func:`observe_attention`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, redispatch_function
from torch.utils.hooks import RemovableHandle

from numwatch.kernels.device import to_device
from numwatch.naming import tensor_name

# Logits (float32) per chunk: 16 MiB, plus the same count of mask bytes when masked.
LOGIT_CHUNK_ELEMENTS = 1 << 22

_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS: dict[str, Any] = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}
# Python-level torch functions that call scaled_dot_product_attention inside: the mode is
# re-entered for their bodies (a mode is off while it handles a call).
_CALLS_SDPA_INSIDE = (F.multi_head_attention_forward,)

# Captures whose forward is running, innermost last (observe_attention records into it).
_active: list[AttentionCapture] = []


def _masked_positions(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask keeps a position out of the softmax: False in a boolean mask; -inf (or the
    most negative finite value, which is how Hugging Face writes a masked position) in an
    additive one. Other additive values are a bias, not part of the measured logit."""
    if mask.dtype == torch.bool:
        return ~mask
    return mask <= torch.finfo(mask.dtype).min


def max_attention_logit(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The largest ``scale * q @ k^T`` over batch, heads and unmasked positions, as a 0-d device tensor.

    Shapes and arguments are those of ``scaled_dot_product_attention``: ``query`` is
    ``(..., L, E)``, ``key`` ``(..., S, E)``, ``scale`` defaults to ``1/sqrt(E)``, the causal
    mask is the top-left one, and with ``enable_gqa`` each group of query heads (dimension -3)
    shares one key head. -inf when every position is masked; NaN when an unmasked logit is NaN.
    """
    return _max_logits(query.unsqueeze(0), key.unsqueeze(0), scale, attn_mask, is_causal, enable_gqa, chunk_elements)[0]


def _max_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    enable_gqa: bool,
    chunk_elements: int,
) -> torch.Tensor:
    """[G]: :func:`max_attention_logit` of each of G calls alike in shapes and arguments,
    stacked along a new first dimension of ``query`` and ``key`` (one set of ops for all)."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    calls = query.size(0)
    with torch.no_grad():
        query, key = query.detach(), key.detach()
        scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
        length, keys = query.size(-2), key.size(-2)
        masked = None
        if attn_mask is not None:
            batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]) if not enable_gqa else query.shape[:-2]
            masked = _masked_positions(attn_mask.detach()).expand(*batch, length, keys)
        if enable_gqa and query.dim() >= 4 and query.size(-3) != key.size(-3):
            groups = query.size(-3) // key.size(-3)
            query = query.unflatten(-3, (key.size(-3), groups))
            key = key.unsqueeze(-3)
            if masked is not None:
                masked = masked.unflatten(-3, (key.size(-4), groups))
        # Scaling q first costs O(L*E), not O(L*S).
        query = query.to(dtype) * scale
        key_t = key.to(dtype).transpose(-2, -1)
        result = torch.full((calls,), -math.inf, dtype=dtype, device=query.device)
        if length == 0 or keys == 0:
            return result
        per_row = math.prod(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])) * keys
        rows = max(1, chunk_elements // max(1, per_row))
        for start in range(0, length, rows):
            stop = min(length, start + rows)
            # Causal: row i sees keys 0..i, so no row of this chunk sees a key past stop-1.
            columns = min(keys, stop) if is_causal else keys
            logits = query[..., start:stop, :] @ key_t[..., :columns]
            if masked is not None:
                logits.masked_fill_(masked[..., start:stop, :columns], -math.inf)
            if is_causal:
                row = torch.arange(start, stop, device=query.device).unsqueeze(-1)
                logits.masked_fill_(torch.arange(columns, device=query.device) > row, -math.inf)
            result = torch.maximum(result, logits.reshape(calls, -1).amax(1))  # NaN propagates
        return result


def _sdpa_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMETERS, args, strict=False))  # positional arguments may stop early
    bound.update(kwargs)
    return bound


class AttentionCapture(TorchFunctionMode):
    """While entered: every SDPA call's max logit, named by the innermost running module of ``model``.

    Module names come from forward hooks on the model's submodules that exist only while the
    capture is entered (per-module hooks: under torch.compile, unlike global ones, they add no
    guard that changes from one measured forward to the next). A module that calls attention
    more than once per forward gets ``name#2``, ...; the same call in several forwards of one
    step (gradient accumulation) keeps the largest value.
    """

    def __init__(
        self, model: nn.Module, chunk_elements: int = LOGIT_CHUNK_ELEMENTS, failed: Callable[[str], None] | None = None
    ) -> None:
        super().__init__()
        self._failed = failed  # told about a failed measurement, which then never reaches the model; None: raise
        self._names = {id(module): tensor_name(name) for name, module in model.named_modules()}
        self._submodules = [(module, tensor_name(name)) for name, module in model.named_modules() if name]
        self._root_name = type(model).__name__
        self.chunk_elements = chunk_elements
        self._running: list[str] = []
        self._calls: dict[str, int] = {}  # this forward's calls per module
        self._pending: list[
            tuple[str, torch.Tensor, torch.Tensor, dict[str, Any]]
        ] = []  # this forward's calls, measured at its end
        self._forwards: list[tuple[list[str], torch.Tensor]] = []  # this step's: call names and their maxima
        self._handles: list[RemovableHandle] = []

    # -- one forward ------------------------------------------------------------------

    def begin(self) -> None:
        """Start intercepting (the forward of a measured step begins)."""
        self._running = []
        self._calls = {}
        self._handles = []
        for module, name in self._submodules:
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._module_entered, name)))
            self._handles.append(
                module.register_forward_hook(self._module_left)
            )  # (reset at the next begin if it raised)
        _active.append(self)
        # TorchFunctionMode's own __enter__ and __exit__ are unannotated in torch.
        self.__enter__()  # type: ignore[no-untyped-call]

    def end(self) -> None:
        """Stop intercepting and measure the forward's calls; what was measured stays until :meth:`take_step`."""
        try:
            self.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # unannotated, as in begin()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            if self in _active:
                _active.remove(self)
            pending, self._pending = self._pending, []
            if pending:
                try:
                    self._forwards.append(([name for name, *_ in pending], self._measure(pending)))
                except Exception:
                    if self._failed is None:
                        raise
                    self._failed("attention capture")

    @torch.no_grad()
    def _measure(self, pending: list[tuple[str, torch.Tensor, torch.Tensor, dict[str, Any]]]) -> torch.Tensor:
        """float32 [calls]: the max logit of each pending call, the calls alike measured together."""
        alike: dict[tuple[Any, ...], list[int]] = {}
        for index, (_, query, key, arguments) in enumerate(pending):
            mask = arguments["attn_mask"]
            signature = (
                query.shape,
                key.shape,
                query.dtype,
                key.dtype,
                query.device,
                arguments["scale"],
                arguments["is_causal"],
                arguments["enable_gqa"],
                None if mask is None else (mask.shape, mask.dtype),
            )
            alike.setdefault(signature, []).append(index)
        parts, order = [], []
        for indices in alike.values():
            query, key, arguments = pending[indices[0]][1:]
            queries = torch.stack([pending[i][1] for i in indices])
            keys = torch.stack([pending[i][2] for i in indices])
            mask = arguments["attn_mask"]
            if mask is not None:
                # One mask per call (they may differ), aligned from the right with a call's logits.
                batch = (
                    query.shape[:-2]
                    if arguments["enable_gqa"]
                    else torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
                )
                masks = torch.stack([pending[i][3]["attn_mask"] for i in indices])
                mask = masks.reshape(len(indices), *([1] * (len(batch) + 2 - mask.dim())), *mask.shape)
            parts.append(
                _max_logits(
                    queries,
                    keys,
                    arguments["scale"],
                    mask,
                    arguments["is_causal"],
                    arguments["enable_gqa"],
                    self.chunk_elements,
                ).float()
            )
            order += indices
        maxima = parts[0] if len(parts) == 1 else torch.cat(parts)
        if order != sorted(order):
            position = {index: row for row, index in enumerate(order)}
            maxima = maxima.index_select(
                0, to_device(torch.tensor([position[i] for i in range(len(order))]), maxima.device)
            )
        return maxima

    @contextlib.contextmanager
    def measuring(self) -> Iterator[AttentionCapture]:
        """:meth:`begin` ... :meth:`end` around a block (one forward)."""
        self.begin()
        try:
            yield self
        finally:
            self.end()

    def _module_entered(self, name: str, module: nn.Module, inputs: Any) -> None:
        self._running.append(name)

    def _module_left(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._running:
            self._running.pop()

    # -- the calls --------------------------------------------------------------------

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CALLS_SDPA_INSIDE:
            with self:
                return redispatch_function(func, types, args, kwargs)
        result = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            bound = _sdpa_arguments(args, kwargs)
            try:
                self.observe(
                    bound["query"],
                    bound["key"],
                    scale=bound["scale"],
                    attn_mask=bound["attn_mask"],
                    is_causal=bound["is_causal"],
                    enable_gqa=bound["enable_gqa"],
                )
            except Exception:
                if self._failed is None:
                    raise
                self._failed("attention capture")
        return result

    def observe(self, query: torch.Tensor, key: torch.Tensor, **arguments: Any) -> None:
        """Record one attention call under the calling module's name; its max logit is taken
        from ``query`` and ``key`` as they are when the forward ends."""
        if query.is_nested or key.is_nested:
            return  # ragged batches: not measured
        module = self._running[-1] if self._running else self._root_name
        calls = self._calls[module] = self._calls.get(module, 0) + 1
        name = module if calls == 1 else f"{module}#{calls}"
        full = {"scale": None, "attn_mask": None, "is_causal": False, "enable_gqa": False, **arguments}
        self._pending.append((name, query, key, full))

    def take_step(self) -> AttentionMaxima:
        """This step's max logit per attention call (first-call order); resets for the next step.
        The same call in several forwards (gradient accumulation) keeps its largest value."""
        forwards, self._forwards = self._forwards, []
        if not forwards:
            return AttentionMaxima([], None)
        names = list(dict.fromkeys(name for call_names, _ in forwards for name in call_names))
        if all(call_names == names for call_names, _ in forwards):
            values = forwards[0][1] if len(forwards) == 1 else torch.stack([maxima for _, maxima in forwards]).amax(0)
            return AttentionMaxima(names, values)
        # Forwards with different calls (rare): merged call by call.
        merged: dict[str, torch.Tensor] = {}
        for call_names, maxima in forwards:
            for name, value in zip(call_names, maxima.unbind(), strict=True):
                merged[name] = value if name not in merged else torch.maximum(merged[name], value)
        return AttentionMaxima(names, torch.stack([merged[name] for name in names]))


class AttentionMaxima(Mapping[str, torch.Tensor]):
    """A step's max logit per attention call name (first-call order), held as one float32
    device tensor (``stacked``, one entry per name) that joins the step's host copy whole."""

    def __init__(self, names: list[str], values: torch.Tensor | None) -> None:
        self.names = names
        self.stacked = values

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        assert self.stacked is not None
        return self.stacked[self.names.index(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def observe_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> None:
    """Report the logits of attention computed by hand (not through ``scaled_dot_product_attention``).

    Call it with the attention's own ``q``, ``k`` (after rotary embeddings) and ``scale``;
    ``mask`` is what ``attn_mask`` would be (boolean: True takes part; additive: -inf masks).
    It records only inside the forward of a step being measured; elsewhere it returns at once.
    """
    if _active:
        _active[-1].observe(query, key, scale=scale, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)
