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

A tensor without state yet, or whose update cannot be rebuilt after the step (NAdam with
coupled weight decay, which adds the pre-step weights to the gradient), reports NaN.
Follows the hot-path rules of :mod:`numwatch.stats`: no host sync (a step count that lives
on the CPU is read there; one on the device stays a tensor), memory bounded by chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

CHUNK = 1 << 22  # elements per pass: bounds the float32 temporaries to a few of these
Scalar = float | Tensor


def _step_count(step: Any) -> Scalar:
    """The step count as the optimizer reads it: a float where it lives on the CPU, else a device tensor."""
    if isinstance(step, Tensor):
        return float(step) if step.device.type == "cpu" else step.float()
    return float(step)


def _chunks(*tensors: Tensor | None) -> Any:
    """Aligned flat float32 chunks of equally shaped tensors (None passes through)."""
    flat = [None if t is None else t.detach().reshape(-1) for t in tensors]
    numel = next(t.numel() for t in flat if t is not None)
    for start in range(0, numel, CHUNK):
        yield [None if t is None else t[start : start + CHUNK].float() for t in flat]


def _reduce(update_and_dominated: Any, numel: int, device: torch.device) -> Tensor:
    """[rms, dominated share] from per-chunk (update, count of ε-dominated elements) pairs."""
    squares = torch.zeros((), dtype=torch.float32, device=device)
    dominated = torch.zeros((), dtype=torch.float32, device=device)
    for update, count in update_and_dominated:
        squares = squares + torch.linalg.vector_norm(update).square()
        dominated = dominated + count
    return torch.stack([(squares / numel).sqrt(), dominated / numel])


def _normalised(moment: Tensor, root: Tensor, eps: Scalar) -> tuple[Tensor, Tensor]:
    """(moment / (root + ε), count of root < ε); ``moment`` and ``root`` are fresh temporaries, reused in place."""
    count = torch.count_nonzero(root < eps)
    return moment.div_(root.add_(eps)), count


def _adam(state: dict, group: dict, param: Tensor) -> Tensor:
    beta1, beta2 = group["betas"]
    eps, t = group["eps"], _step_count(state["step"])
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]

    def parts() -> Any:
        # The chunks may be the state itself (float32): only new tensors are changed in place.
        for m, v_chunk in _chunks(state["exp_avg"], v):
            yield _normalised(m / bc1, v_chunk.div(bc2).sqrt_(), eps)

    return _reduce(parts(), param.numel(), param.device)


def _nadam(state: dict, group: dict, param: Tensor) -> Tensor | None:
    if group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False):
        return None
    if param.grad is None:
        return None
    beta1, beta2 = group["betas"]
    eps, psi, t = group["eps"], group["momentum_decay"], _step_count(state["step"])
    bc2 = 1 - beta2**t
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    mu_product = state["mu_product"]
    mu_product = float(mu_product) if mu_product.device.type == "cpu" else mu_product
    grad_factor, moment_factor = (1.0 - mu) / (1.0 - mu_product), mu_next / (1.0 - mu_product * mu_next)
    sign = -1.0 if group.get("maximize") else 1.0

    def parts() -> Any:
        for m, v, g in _chunks(state["exp_avg"], state["exp_avg_sq"], param.grad):
            yield _normalised(moment_factor * m + (grad_factor * sign) * g, v.div(bc2).sqrt_(), eps)

    return _reduce(parts(), param.numel(), param.device)


def _radam(state: dict, group: dict, param: Tensor) -> Tensor:
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

    return _reduce(parts(), param.numel(), param.device)


def _measure(optimizer: torch.optim.Optimizer) -> Any:
    # NAdam and RAdam first: AdamW subclasses Adam, and the others must not fall through to it.
    for kind, measure in ((torch.optim.NAdam, _nadam), (torch.optim.RAdam, _radam), (torch.optim.Adam, _adam)):
        if isinstance(optimizer, kind):
            return measure
    return None


def _batched_adam(members: list[tuple[int, dict, dict, Tensor]], result: Tensor) -> None:
    """Adam/AdamW of small tensors whose step count is on the CPU, a few multi-tensor ops
    per batch of at most CHUNK elements (not a dozen ops per tensor); into ``result``."""
    batch: list[tuple[int, dict, dict, Tensor]] = []
    size = 0
    for member in members:
        if batch and size + member[3].numel() > CHUNK:
            _adam_batch(batch, result)
            batch, size = [], 0
        batch.append(member)
        size += member[3].numel()
    if batch:
        _adam_batch(batch, result)


def _adam_batch(batch: list[tuple[int, dict, dict, Tensor]], result: Tensor) -> None:
    corrections1, corrections2, eps, moments, seconds = [], [], [], [], []
    for _, state, group, _ in batch:
        beta1, beta2 = group["betas"]
        t = _step_count(state["step"])
        corrections1.append(1 - beta1**t)
        corrections2.append(1 - beta2**t)
        eps.append(group["eps"])
        moments.append(state["exp_avg"].detach().reshape(-1).float())
        seconds.append((state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]).detach().reshape(-1).float())
    roots = torch._foreach_div(seconds, corrections2)
    torch._foreach_sqrt_(roots)
    below = torch._foreach_sub(roots, eps)
    torch._foreach_clamp_max_(below, 0.0)
    dominated = torch.stack(torch._foreach_norm(below, 0))  # nonzero exactly where √v̂ < ε
    torch._foreach_add_(roots, eps)
    updates = torch._foreach_div(moments, corrections1)
    torch._foreach_div_(updates, roots)
    norms = torch.stack(torch._foreach_norm(updates))
    numel = torch.tensor([m.numel() for m in moments], dtype=torch.float32).to(norms.device, non_blocking=True)
    positions = torch.tensor([position for position, *_ in batch]).to(result.device, non_blocking=True)
    result[:, positions] = torch.stack([norms / numel.sqrt(), dominated / numel]).to(result.device)


def adam_health(optimizer: torch.optim.Optimizer | None, parameters: Sequence[Tensor]) -> Tensor:
    """float32 [2, n]: ``adam_update_rms`` and ``adam_eps_dominated`` of each parameter,
    NaN where it has no Adam-family state (see the module docstring)."""
    device = parameters[0].device if parameters else torch.device("cpu")
    result = torch.full((2, len(parameters)), math.nan, dtype=torch.float32, device=device)
    measure = _measure(optimizer) if optimizer is not None else None
    if measure is None:
        return result
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    batched: dict[tuple[torch.device, torch.dtype], list[tuple[int, dict, dict, Tensor]]] = {}
    for position, param in enumerate(parameters):
        state = optimizer.state.get(param)
        if not state or "exp_avg" not in state or param.numel() == 0:
            continue
        group = groups[id(param)]
        step = state["step"]
        on_host = not isinstance(step, Tensor) or step.device.type == "cpu"
        if measure is _adam and on_host and param.numel() <= CHUNK:
            batched.setdefault((state["exp_avg"].device, state["exp_avg"].dtype), []).append((position, state, group, param))
            continue
        column = measure(state, group, param)
        if column is not None:
            result[:, position] = column.to(device)
    for members in batched.values():
        _batched_adam(members, result)
    return result
