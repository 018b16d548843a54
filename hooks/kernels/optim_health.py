"""Adam-family optimizer health per tensor: the normalised update and ε's share in it.

Read right after ``optimizer.step()``, from the state that step just wrote, with the
optimizer's own bias correction and its param group's ε, so the numbers describe the
update that was applied:

* ``adam_update_rms``: RMS over the tensor's elements of the update before the learning
  rate. Adam/AdamW: m̂ / (√v̂ + ε) with m̂ = m / (1 − β₁ᵗ), v̂ = v / (1 − β₂ᵗ) (v the running
  maximum with ``amsgrad``). NAdam: its Nesterov combination
  (μₜ₊₁ m / (1 − Πμ≤ₜ₊₁) + (1 − μₜ) g / (1 − Πμ≤ₜ)) / (√v̂ + ε). RAdam: r · m̂ · √(1 − β₂ᵗ)
  / (√v + ε) once its variance is tractable (ρₜ > 5), m̂ before.
* ``adam_eps_dominated``: share of elements whose ε exceeds the term it is added to:
  √v̂ < ε (RAdam adds ε to √v, so there √v < ε).

NAdam with coupled weight decay adds λ·w to the gradient before its update, w the weights
before the step: their copy (``before``, the sampled step's snapshot) rebuilds it; without
one that update cannot be rebuilt and reports NaN. A tensor without state yet reports NaN.

Sharded parameters (DTensor) are measured on this rank's shard of their state:
:func:`adam_sums` gives sums over the local elements, which add up across the shards.
Follows the hot-path rules of :mod:`numwatch.kernels.stats`: no host sync (a step count that lives
on the CPU is read there; one on the device stays a tensor), memory bounded by chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from numwatch.kernels.chunks import SECOND, WORK, layout_of, scratch
from numwatch.kernels.device import accelerator_path, to_device
from numwatch.kernels.sharded import local_tensor

CHUNK = 1 << 22  # elements per pass: bounds the float32 temporaries to a few of these
Scalar = float | Tensor
State = dict[str, Any]  # an optimizer's per-parameter state or param group
# Per-parameter sums of one optimizer kind: (state, param group, param, weights before) -> [2] or None.
Measure = Callable[[State, State, Tensor, Tensor | None], Tensor | None]


def _step_count(step: Any) -> Scalar:
    """The step count: a float where it lives on the host, else a device tensor (float64 where the
    device has it: the bias corrections and RAdam's rectification cancel digits, as in float math)."""
    if isinstance(step, Tensor):
        if not accelerator_path(step.device):
            return float(step)
        return step.float() if step.device.type == "mps" else step.double()
    return float(step)


def _chunks(*tensors: Tensor | None) -> Any:
    """Aligned flat float32 chunks of equally shaped tensors, or of their local shards (None passes through)."""
    flat = [None if t is None else local_tensor(t).detach().reshape(-1) for t in tensors]
    numel = next(t.numel() for t in flat if t is not None)
    for start in range(0, numel, CHUNK):
        yield [None if t is None else t[start : start + CHUNK].float() for t in flat]


def _sums(update_and_dominated: Any, device: torch.device) -> Tensor:
    """[Σ update², count of ε-dominated elements] from per-chunk (update, count) pairs."""
    squares = torch.zeros((), dtype=torch.float32, device=device)
    dominated = torch.zeros((), dtype=torch.float32, device=device)
    for update, count in update_and_dominated:
        squares = squares + torch.linalg.vector_norm(update).square()
        dominated = dominated + count
    return torch.stack([squares, dominated])


def _normalised(moment: Tensor, root: Tensor, eps: Scalar) -> tuple[Tensor, Tensor]:
    """(moment / (root + ε), count of root < ε); ``moment`` and ``root`` are fresh temporaries, reused in place."""
    count = torch.count_nonzero(root < eps)
    return moment.div_(root.add_(eps)), count


def _adam(state: State, group: State, param: Tensor, before: Tensor | None) -> Tensor:
    beta1, beta2 = group["betas"]
    eps, t = group["eps"], _step_count(state["step"])
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]

    def parts() -> Any:
        # The chunks may be the state itself (float32): only new tensors are changed in place.
        for m, v_chunk in _chunks(state["exp_avg"], v):
            yield _normalised(m / bc1, v_chunk.div(bc2).sqrt_(), eps)

    return _sums(parts(), param.device)


def _nadam(state: State, group: State, param: Tensor, before: Tensor | None) -> Tensor | None:
    coupled_decay = 0.0 if group.get("decoupled_weight_decay", False) else group["weight_decay"]
    if param.grad is None or (coupled_decay != 0 and before is None):
        return None
    beta1, beta2 = group["betas"]
    eps, psi, t = group["eps"], group["momentum_decay"], _step_count(state["step"])
    bc2 = 1 - beta2**t
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    mu_product = state["mu_product"]
    mu_product = mu_product if accelerator_path(mu_product.device) else float(mu_product)
    grad_factor, moment_factor = (1.0 - mu) / (1.0 - mu_product), mu_next / (1.0 - mu_product * mu_next)
    sign = -1.0 if group.get("maximize") else 1.0

    def parts() -> Any:
        for m, v, g, w in _chunks(state["exp_avg"], state["exp_avg_sq"], param.grad, before if coupled_decay else None):
            # The gradient the step used: (−)g, plus λ·w_before with coupled weight decay
            # (the chunks may be the gradient itself: only the new product changes in place).
            used = g * sign if w is None else (g * sign).add_(w, alpha=coupled_decay)
            yield _normalised(moment_factor * m + grad_factor * used, v.div(bc2).sqrt_(), eps)

    return _sums(parts(), param.device)


def _radam(state: State, group: State, param: Tensor, before: Tensor | None) -> Tensor:
    beta1, beta2 = group["betas"]
    eps, t = group["eps"], _step_count(state["step"])
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5

    def parts() -> Any:
        for m, v in _chunks(state["exp_avg"], state["exp_avg_sq"]):
            moment = m / bc1
            adapted, count = _normalised(moment * (rect * bc2**0.5), v.sqrt(), eps)
            if isinstance(rho_t, Tensor):
                update = torch.where(rho_t > 5, adapted, moment)
            else:
                update = adapted if rho_t > 5 else moment
            yield update, count

    return _sums(parts(), param.device)


def _measure(optimizer: torch.optim.Optimizer) -> Measure | None:
    # NAdam and RAdam first: AdamW subclasses Adam, and the others must not fall through to it.
    measures: tuple[tuple[type[torch.optim.Optimizer], Measure], ...] = (
        (torch.optim.NAdam, _nadam),
        (torch.optim.RAdam, _radam),
        (torch.optim.Adam, _adam),
    )
    for kind, measure in measures:
        if isinstance(optimizer, kind):
            return measure
    return None


def adam_family(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer's state is one these statistics read."""
    return optimizer is not None and _measure(optimizer) is not None


def _local_numel(param: Tensor) -> int:
    return local_tensor(param).numel()


def _adam_batches(
    optimizer: torch.optim.Optimizer, parameters: Sequence[Tensor]
) -> tuple[dict[tuple[int, float], list[int]], list[int]]:
    """Adam/AdamW parameters with state (and local elements), by (param group, step count)
    when the count lives on the host (the usual case: the same bias correction for the whole
    batch), and the others."""
    groups = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    batches: dict[tuple[int, float], list[int]] = {}
    singles, on_host, host_steps = [], [], []
    for position, param in enumerate(parameters):
        state = optimizer.state.get(param)
        if not state or "exp_avg" not in state or _local_numel(param) == 0:
            continue
        step = state["step"]
        if not isinstance(step, Tensor):
            batches.setdefault((groups[id(param)], float(step)), []).append(position)
        elif not accelerator_path(step.device):
            on_host.append(position)
            host_steps.append(step)
        else:
            singles.append(position)
    # Every host step count read at once (one stack, one read), not one read per tensor.
    for position, t in zip(on_host, torch.stack(host_steps).tolist() if host_steps else [], strict=True):
        batches.setdefault((groups[id(parameters[position])], float(t)), []).append(position)
    return batches, singles


def _adam_batch(optimizer: torch.optim.Optimizer, group: State, t: float, params: list[Tensor]) -> Tensor:
    """float32 [k, 2] sums for Adam/AdamW parameters sharing a param group and a step count:
    each flat chunk of the moments is read once (ops independent of k)."""
    beta1, beta2 = group["betas"]
    eps, bc1, bc2 = group["eps"], 1 - beta1**t, 1 - beta2**t
    states = [optimizer.state[p] for p in params]
    ms = [local_tensor(state["exp_avg"]) for state in states]
    vs = [local_tensor(state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]) for state in states]
    layout = layout_of(ms)
    results = []
    for part in layout.groups:
        moments, seconds = part.tensors(ms), part.tensors(vs)
        squares, dominated = [], []
        for chunk in part.chunks:
            root = chunk.into(seconds, WORK, torch.float32).div_(bc2).sqrt_()
            below = torch.lt(root, eps, out=scratch(chunk.numel, torch.float32, part.device, SECOND))
            dominated.append(chunk.sums(below))
            update = chunk.into(moments, SECOND, torch.float32).div_(bc1).div_(root.add_(eps))
            squares.append(torch.stack(torch._foreach_norm(chunk.split(update), 2)).square_())
        results.append(torch.stack([part.per_member(squares, "sum"), part.per_member(dominated, "sum")], 1))
    return layout.assemble(results, math.nan, torch.float32, (2,))


def adam_sums(
    optimizer: torch.optim.Optimizer | None, parameters: Sequence[Tensor], before: Sequence[Tensor] | None = None
) -> Tensor:
    """float32 [2, n]: Σ update² and the count of ε-dominated elements over each parameter's
    elements (its local shard's, for a DTensor; 0 for an empty shard), NaN where it has no
    Adam-family state or its update cannot be rebuilt. ``before``: the weights before the
    step, aligned with ``parameters`` (needed by NAdam with coupled weight decay only)."""
    device = local_tensor(parameters[0]).device if parameters else torch.device("cpu")
    measure = _measure(optimizer) if optimizer is not None else None
    if not parameters:
        return torch.zeros((2, 0), dtype=torch.float32, device=device)
    if optimizer is None or measure is None:  # no Adam-family state to read
        return torch.full((2, len(parameters)), math.nan, dtype=torch.float32, device=device)
    rows: list[Tensor] = []  # [k, 2] blocks, for the positions in `order`
    order: list[int] = []
    if measure is _adam:
        batches, singles = _adam_batches(optimizer, parameters)
        for (group_index, t), positions in batches.items():
            rows.append(
                _adam_batch(optimizer, optimizer.param_groups[group_index], t, [parameters[i] for i in positions]).to(
                    device, non_blocking=True
                )
            )
            order += positions
    else:
        singles = list(range(len(parameters)))
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    # With state but no local elements (an empty shard): they add nothing.
    empty = {
        p
        for p, param in enumerate(parameters)
        if _local_numel(param) == 0 and "exp_avg" in optimizer.state.get(param, {})
    }
    for position in singles:
        param = parameters[position]
        state = optimizer.state.get(param)
        if not state or "exp_avg" not in state or position in empty:
            continue
        column = measure(state, groups[id(param)], param, None if before is None else before[position])
        if column is not None:
            rows.append(column.to(device, non_blocking=True).reshape(1, 2))
            order.append(position)
    # One gather puts the blocks in parameter order; a NaN row and a zero row stand for the rest.
    rows += [torch.full((1, 2), math.nan, device=device), torch.zeros((1, 2), device=device)]
    row_of = {position: row for row, position in enumerate(order)}
    fill = {position: len(order) + 1 for position in empty}
    index = to_device(
        torch.tensor([row_of.get(position, fill.get(position, len(order))) for position in range(len(parameters))]),
        device,
    )
    return torch.cat(rows).index_select(0, index).t()


def health_from_sums(sums: Tensor, numels: Tensor) -> Tensor:
    """float32 [2, n] ``adam_update_rms`` and ``adam_eps_dominated`` from :func:`adam_sums`
    (summed over the shards, where sharded) and the tensors' element counts (float [n])."""
    return torch.stack([(sums[0] / numels).sqrt(), sums[1] / numels]).float()


def adam_health(
    optimizer: torch.optim.Optimizer | None, parameters: Sequence[Tensor], before: Sequence[Tensor] | None = None
) -> Tensor:
    """float32 [2, n]: ``adam_update_rms`` and ``adam_eps_dominated`` of each (unsharded)
    parameter, NaN where it has no Adam-family state (see the module docstring)."""
    sums = adam_sums(optimizer, parameters, before)
    return health_from_sums(sums, to_device(torch.tensor([float(p.numel()) for p in parameters]), sums.device))
