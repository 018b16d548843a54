"""Everything numwatch reads from a DeepSpeed engine beyond its public API, in one place.

DeepSpeed's ZeRO optimizers (stages 1 and 2: ``DeepSpeedZeroOptimizer``; stage 3:
``DeepSpeedZeroOptimizer_Stage3``) keep no gradient in ``.grad``: after the backward each
rank holds the reduced (averaged) gradient of its partition only, loss-scaled under fp16.
What this module reads, and where:

* Which elements of each parameter this rank holds (:class:`ZeroPartition`): under stages
  1 and 2, DeepSpeed's record of where it inserts each gradient into the rank's flat partition
  (``grad_start_offset``, ``grad_partition_insertion_offset``), which its flat fp32 partition
  shares; under stage 3, the parameter's own partition (``ds_tensor``), the
  ``partition_numel()`` elements from rank × that, the last rank's padding left out.
* The gradient of that fragment at the start of the optimizer's ``step()``, before DeepSpeed
  unscales and clips it, from ``averaged_gradients``, the lists DeepSpeed's own norm reads:
  aligned with ``params_in_partition`` once the zero padding is left out (stages 1, 2), with
  ``fp16_groups`` (stage 3). ``safe_get_full_grad`` gives the same values at a collective per
  tensor (and, with ``round_robin_gradients``, picks another parameter's gradient).
* The fp32 optimizer state of the fragment (Adam's moments): the inner torch optimizer's
  state of the flat fp32 partition, sliced at the fragment's place.
* The loss scale (``loss_scale``: the dynamic scaler's current scale, hysteresis and all),
  whether the step overflowed and was skipped (``overflow``), the global norm it computed
  (``_global_grad_norm``, which ``engine.get_global_grad_norm()`` returns), the clipping
  threshold (``clip_grad``).

:func:`deepspeed_engine` finds the engine behind what ``watch()`` was given and refuses,
with :class:`UnsupportedConfiguration` naming it, every DeepSpeed setup these readings do not
cover. DeepSpeed is never imported here: a process that uses it has imported it already.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from numwatch.kernels.fragments import Fragment, FragmentReduction
from numwatch.kernels.sharded import UnsupportedConfiguration, from_deepspeed

ZERO_OPTIMIZERS = {"DeepSpeedZeroOptimizer": (1, 2), "DeepSpeedZeroOptimizer_Stage3": (3,)}
ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# DeepSpeed's clip coefficient: max(1, (‖g‖ + ε) / clip), as in its unscale_and_clip_grads.
CLIP_EPSILON = 1e-6


def _is_engine(obj: object) -> bool:
    return any(
        cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed.") for cls in type(obj).__mro__
    )


def _managed_by_deepspeed(model: object) -> bool:
    """Whether the parameters belong to a ZeRO optimizer (stage 1/2 fragments, stage 3 partitions)."""
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in parameters)


def _find(match: Callable[[Any], bool]) -> Any:
    """The live DeepSpeed engine ``match`` accepts, or None (one walk over the collector's
    objects, once when watching starts: the engine keeps no reference its parts could follow)."""
    return next((obj for obj in gc.get_objects() if _is_engine(obj) and match(obj)), None)


def deepspeed_engine(model: object, optimizer: object | None) -> Any:
    """The DeepSpeed engine ``watch(model, optimizer)`` is about, or None when DeepSpeed has no
    part in them. ``model`` may be the engine or its module; ``optimizer`` the engine's
    optimizer, a wrapper of it (Accelerate's ``.optimizer``), or None.

    Raises :class:`UnsupportedConfiguration` for DeepSpeed setups numwatch cannot measure
    exactly, and for DeepSpeed objects it finds no engine for.
    """
    if "deepspeed" not in sys.modules:
        return None
    wrapped = getattr(optimizer, "optimizer", None)
    given = [o for o in (optimizer, wrapped) if o is not None]
    zero = next((o for o in given if from_deepspeed(o)), None)
    engine: Any
    if _is_engine(model):
        engine = model
    else:
        # Also an engine without ZeRO, whose optimizer is the user's own: its reductions and
        # clipping run outside the autograd backward numwatch would read.
        engine = _find(lambda candidate: candidate.module is model or any(candidate.optimizer is o for o in given))
    if engine is None:
        if zero is not None or from_deepspeed(model) or _managed_by_deepspeed(model):
            raise UnsupportedConfiguration(
                "numwatch: these DeepSpeed (ZeRO) objects belong to no live DeepSpeed engine; watch the engine "
                "deepspeed.initialize returned: numwatch.watch(engine)"
            )
        return None
    if zero is not None and zero is not engine.optimizer:
        raise UnsupportedConfiguration("numwatch: this optimizer is not the DeepSpeed engine's; pass engine.optimizer")
    refuse_unsupported_engine(engine)
    return engine


def _offload_device(offload: Any) -> str | None:
    device = getattr(offload, "device", None)
    name = str(getattr(device, "value", device)) if device is not None else None
    return None if name in (None, "none") else name


def refuse_unsupported_engine(engine: Any) -> None:
    """Raise :class:`UnsupportedConfiguration` naming the first feature of ``engine`` whose
    gradients or optimizer state are not where :class:`ZeroPartition` reads them."""
    stage = engine.zero_optimization_stage()
    optimizer = engine.optimizer
    kind = type(optimizer).__name__
    refusal = None
    zero = engine._config.zero_config
    offloaded = {
        "optimizer": _offload_device(zero.offload_optimizer),
        "parameters": _offload_device(zero.offload_param),
    }
    if type(engine).__name__ == "PipelineEngine":
        refusal = "pipeline parallelism (PipelineEngine)"
    elif "nvme" in offloaded.values():
        what = [name for name, device in offloaded.items() if device == "nvme"]
        refusal = f"ZeRO-Infinity offload of the {' and '.join(what)} to NVMe"
    elif any(offloaded.values()):
        what = [f"{name} to {device}" for name, device in offloaded.items() if device]
        refusal = f"ZeRO-Offload of the {' and '.join(what)}"
    elif stage == 0:
        refusal = f"no ZeRO (stage 0, {kind})"
    elif kind == "BF16_Optimizer":
        refusal = "BF16_Optimizer (bf16 with fp32 gradient accumulation at ZeRO stage 1)"
    elif kind not in ZERO_OPTIMIZERS or stage not in ZERO_OPTIMIZERS[kind]:
        refusal = f"the optimizer {kind} at ZeRO stage {stage}"
    elif zero.zero_hpz_partition_size > 1 or zero.zero_quantized_weights or zero.zero_quantized_gradients:
        refusal = "ZeRO++ (hpZ partitions, quantized weights or gradients)"
    elif engine.has_moe_layers:
        refusal = "mixture-of-experts layers (expert parameters reduce over their own groups)"
    elif engine.mpu is not None or engine.autotp_size() > 1:
        refusal = "model or tensor parallelism (mpu, AutoTP)"
    elif getattr(engine, "zenflow", False):
        refusal = "ZenFlow"
    elif engine.is_deepcompile_active():
        refusal = "DeepCompile"
    elif getattr(optimizer, "torch_autocast_gradscaler", None) is not None or engine.torch_autocast_enabled():
        refusal = "torch_autocast (DeepSpeed's GradScaler path)"
    elif any(group.get("use_muon") for group in optimizer.param_groups):
        refusal = "the Muon optimizer (its update replaces the gradient before the norm)"
    elif _partition_group(optimizer, stage) is None:
        refusal = "parameter groups reduced over different process groups"
    elif dist.get_world_size(_partition_group(optimizer, stage)) != dist.get_world_size():
        refusal = "a data-parallel group smaller than the world (sequence, tensor or expert parallelism)"
    if refusal is not None:
        raise UnsupportedConfiguration(
            f"numwatch: DeepSpeed with {refusal} is not supported: its gradients are not where numwatch reads them "
            "exactly. Supported: ZeRO stages 1, 2 and 3 without offload, in fp32, bf16 or fp16 "
            "(see docs/frameworks-deepspeed.md)."
        )


def _partition_group(optimizer: Any, stage: int) -> Any:
    """The process group the ZeRO partitions span; None when the param groups differ."""
    if stage == 3:
        groups = {
            id(getattr(p, "ds_process_group", optimizer.dp_process_group)): p for g in optimizer.fp16_groups for p in g
        }
        return optimizer.dp_process_group if len(groups) <= 1 else None
    real = list(optimizer.real_dp_process_group)
    return real[0] if all(group is real[0] for group in real) else None


def _flat_range(tensor: Tensor, start: int, numel: int) -> Tensor:
    """``numel`` elements of ``tensor`` flattened, from ``start``; no view op where none is needed
    (each is an op dispatched per tensor per step)."""
    flat = tensor if tensor.dim() == 1 else tensor.reshape(-1)
    return flat if start == 0 and numel == flat.numel() else flat.narrow(0, start, numel)


@dataclass
class _StateSlot:
    """Where one parameter's fragment lies in the inner optimizer's flat fp32 partition."""

    flat: Tensor  # the inner optimizer's parameter (a flat fp32 partition)
    group: int  # its param group in the inner optimizer
    start: int
    numel: int


class ZeroPartition:
    """The watched parameters as this rank holds them under ZeRO: fragments of their
    gradients, weights and Adam state, and the reduction that combines them."""

    def __init__(self, engine: Any, parameters: list[Any]) -> None:
        # Any: DeepSpeed adds its attributes (ds_shape, ds_numel...) to the parameters.
        self.optimizer = engine.optimizer
        self.stage = engine.zero_optimization_stage()
        self.parameters = parameters
        group = _partition_group(self.optimizer, self.stage)
        rank = dist.get_rank(group)
        self.shapes = [tuple(p.ds_shape) if self.stage == 3 else tuple(p.shape) for p in parameters]
        # Where each parameter's gradient is in averaged_gradients: the lists DeepSpeed's own norm
        # reads, aligned with fp16_groups (stage 3) or, padding left out, params_in_partition.
        groups = self.optimizer.fp16_groups if self.stage == 3 else self.optimizer.params_in_partition
        place = {id(p): (i, j) for i, members in enumerate(groups) for j, p in enumerate(members)}
        self._places = [place.get(id(p)) for p in parameters]
        if self.stage == 3:
            starts = [rank * p.partition_numel() for p in parameters]
            numels = [max(0, min(p.partition_numel(), p.ds_numel - s)) for p, s in zip(parameters, starts, strict=True)]
            self._offsets = [0] * len(parameters)  # set per sub group by _slots (grad_position)
        else:
            starts, numels, self._offsets = self._partition_layout(parameters, rank)
        self.fragments = [Fragment(shape, s, n) for shape, s, n in zip(self.shapes, starts, numels, strict=True)]
        self.reduction = FragmentReduction(group, self.fragments)
        self._empty = torch.empty(0, dtype=parameters[0].dtype, device=parameters[0].device)

    def _partition_layout(self, parameters: list[Any], rank: int) -> tuple[list[int], list[int], list[int]]:
        """Stages 1, 2: each parameter's fragment in this rank's partition, from DeepSpeed's own
        bookkeeping of where it inserts the gradients (which the flat fp32 partition shares):
        (first element in the parameter, elements, offset in the partition); 0s where none is held.
        (``_hp_mapping`` places the fp32 fragments wrongly under ``round_robin_gradients``.)"""
        optimizer = self.optimizer
        group_of = {id(p): i for i, members in enumerate(optimizer.bit16_groups) for p in members}
        starts, numels, offsets = [], [], []
        for parameter, where in zip(parameters, self._places, strict=True):
            group = group_of[id(parameter)]
            param_id = optimizer.get_param_id(parameter)
            offset = optimizer.grad_partition_insertion_offset[group][rank].get(param_id)
            if where is None or offset is None:
                if (where is None) != (offset is None):
                    raise UnsupportedConfiguration(
                        "numwatch: DeepSpeed's partition bookkeeping (params_in_partition, insertion offsets) "
                        "disagrees; this DeepSpeed version or setup is not supported"
                    )
                starts.append(0)
                numels.append(0)
                offsets.append(0)
                continue
            start = int(optimizer.grad_start_offset[group][rank][param_id])
            starts.append(start)
            numels.append(int(min(parameter.numel() - start, int(optimizer.partition_size[group]) - offset)))
            offsets.append(int(offset))
        return starts, numels, offsets

    def param_groups(self) -> dict[int, int]:
        """The optimizer's param group of each parameter, by ``id`` (its groups hold flat partitions)."""
        if self.stage == 3:
            by_sub_group = self.optimizer.sub_group_to_group_id
            return {id(p): by_sub_group[i] for i, sub in enumerate(self.optimizer.fp16_groups) for p in sub}
        return {id(p): i for i, group in enumerate(self.optimizer.bit16_groups) for p in group}

    def gradients(self) -> list[Tensor]:
        """Flat gradient fragments as DeepSpeed holds them before its step (reduced, averaged,
        loss-scaled under fp16), one per watched parameter (empty where this rank holds none)."""
        averaged = self.optimizer.averaged_gradients
        lists: dict[int, list[Tensor]] = {}
        grads = []
        for where, fragment in zip(self._places, self.fragments, strict=True):
            if where is None:
                grads.append(self._empty)
                continue
            group, index = where
            if group not in lists:
                # Stages 1 and 2 put zero padding between the fragments (marked); stage 3 has none.
                lists[group] = [g for g in averaged[group] if not getattr(g, "_zero_padding", False)]
            grad = lists[group][index]  # stage 3: the partition, the last rank's padded
            start = (
                fragment.start if grad.numel() > fragment.numel and self.stage < 3 else 0
            )  # a whole-parameter buffer
            grads.append(_flat_range(grad, start, fragment.numel))
        return grads

    def weights(self) -> list[Tensor]:
        """Flat fragments of the weights the model computes with (its dtype), aligned with the gradients'."""
        if self.stage == 3:
            return [_flat_range(p.ds_tensor, 0, f.numel) for p, f in zip(self.parameters, self.fragments, strict=True)]
        return [_flat_range(p.detach(), f.start, f.numel) for p, f in zip(self.parameters, self.fragments, strict=True)]

    def _slots(self) -> list[_StateSlot | None]:
        """Each fragment's place in the inner optimizer's flat fp32 partitions (None: none held)."""
        slots: list[_StateSlot | None] = []
        for parameter, fragment, where, offset in zip(
            self.parameters, self.fragments, self._places, self._offsets, strict=True
        ):
            if fragment.numel == 0 or where is None:
                slots.append(None)
            elif self.stage == 3:
                sub_group = where[0]
                _, offset, _ = self.optimizer.grad_position[self.optimizer.get_param_id(parameter)]
                flat = self.optimizer.fp32_partitioned_groups_flat[sub_group]
                slots.append(_StateSlot(flat, self.optimizer.sub_group_to_group_id[sub_group], offset, fragment.numel))
            else:
                group = where[0]
                flat = self.optimizer.single_partition_of_fp32_groups[group]
                slots.append(_StateSlot(flat, group, offset, fragment.numel))
        return slots

    def adam_view(self) -> tuple[torch.optim.Optimizer, list[Tensor]]:
        """The inner torch optimizer seen through this rank's fragments: an object of its
        class whose parameters are the fragments of the fp32 master weights, each with the
        matching slices of its state (step count included), and those fragments in watched
        order. Before the first update nothing has state (NaN); after it, a fragment this
        rank does not hold has an empty state, which adds nothing to the combined sums."""
        inner = self.optimizer.optimizer
        view = object.__new__(type(inner))  # only param_groups and state are read
        groups = [{**group, "params": []} for group in inner.param_groups]
        state: dict[Tensor, dict[str, Any]] = {}
        stepped = any("exp_avg" in held for held in inner.state.values())
        keys = []
        for slot in self._slots():
            if slot is None:
                key = self._empty.new_empty(0, dtype=torch.float32)
                if stepped:
                    state[key] = {"exp_avg": key}
            else:
                key = slot.flat.detach().narrow(0, slot.start, slot.numel)
                groups[slot.group]["params"].append(key)
                held = inner.state.get(slot.flat)
                if held and "exp_avg" in held:
                    state[key] = {
                        name: value.narrow(0, slot.start, slot.numel) if name in ADAM_STATE else value
                        for name, value in held.items()
                    }
            keys.append(key)
        view.param_groups, view.state = groups, state
        return view, keys


class EngineAdapter:
    """Read-only views of one engine's per-step state, and the patches numwatch puts on it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.optimizer = engine.optimizer
        self._patched: list[tuple[object, str, Callable[..., Any]]] = []

    @property
    def loss_scaled(self) -> bool:
        """Whether the gradients are loss-scaled (fp16)."""
        return bool(self.engine.fp16_enabled())

    def loss_scale(self) -> float:
        """The current loss scale (1 outside fp16)."""
        return float(self.optimizer.loss_scale) if self.loss_scaled else 1.0

    def overflowed(self) -> bool:
        """Whether the last step found Inf/NaN gradients and skipped the update."""
        return bool(self.optimizer.overflow)

    def accumulation_steps(self) -> int:
        return int(self.engine.gradient_accumulation_steps())

    def boundary(self, parameter: Tensor) -> bool:
        """Whether the backward under way is the accumulation boundary's (its step follows)."""
        return bool(self.engine.is_gradient_accumulation_boundary())

    def held(self, parameter: Tensor) -> Tensor | None:
        """ZeRO-1 with accumulation: the rank's own gradient of ``parameter`` summed over the
        step's earlier micro-batches (in ``.grad``, or in ``grad_accum`` when DeepSpeed
        accumulates in another dtype), before the boundary reduces it."""
        if getattr(self.optimizer, "use_grad_accum_attribute", False):
            held: Tensor | None = getattr(parameter, "grad_accum", None)
            return held
        return parameter.grad

    def applied_factor(self, scale_before: float) -> Tensor | float | None:
        """The factor DeepSpeed multiplied the unscaled gradients by before the update of the
        step that just ran (clipping to ``gradient_clipping``, and unscaling by the scale as
        it stood after its update, which differs from ``scale_before`` on a step where the
        scale grows); None without clipping. Computed where DeepSpeed's norm is (a device
        tensor, or a float), so reading it never waits for the device."""
        clip = float(self.optimizer.clip_grad)
        # What engine.get_global_grad_norm() returns: the norm the optimizer's step computed.
        norm = getattr(self.optimizer, "_global_grad_norm", None)
        if clip <= 0.0 or norm is None:
            return None
        scale_after = self.loss_scale()
        # The scaled norm DeepSpeed clips with: stage 3 divides it by the scale after the update.
        scaled_by = scale_after if self.engine.zero_optimization_stage() == 3 else scale_before
        ratio = scaled_by / scale_after
        if isinstance(norm, Tensor):
            coefficient: Tensor | float = ((norm.double() * ratio + CLIP_EPSILON) / clip).clamp(min=1.0)
        else:
            coefficient = max(1.0, (float(norm) * ratio + CLIP_EPSILON) / clip)
        return scale_before / (coefficient * scale_after)

    def patch(self, owner: object, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace ``owner``'s method ``name`` (on the instance) by ``wrapper(original)`` until :meth:`restore`."""
        if name in vars(owner):
            raise RuntimeError(f"this DeepSpeed {type(owner).__name__}.{name} is already patched (watched twice?)")
        patched = wrapper(getattr(owner, name))
        setattr(owner, name, patched)
        self._patched.append((owner, name, patched))

    def restore(self) -> None:
        """Remove the patches still in place (one replaced since is left to whoever replaced it)."""
        for owner, name, patched in reversed(self._patched):
            if vars(owner).get(name) is patched:
                delattr(owner, name)
        self._patched.clear()
