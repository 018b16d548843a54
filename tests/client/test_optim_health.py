"""Adam-family health (update RMS, ε-dominated share) against float64 references written here."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from numwatch.kernels import optim_health
from numwatch.kernels.optim_health import adam_health

# Every statistic here holds on the CPU path and on the accelerator path (tests/client/conftest.py).
pytestmark = pytest.mark.usefixtures("device_path")

EPS = 1e-8


def chosen_state(step: int, beta2: float = 0.999) -> tuple[torch.Tensor, torch.Tensor, int]:
    """m and v (float32) with 3 elements whose √v̂ is just below ε and 5 just above."""
    rng = np.random.default_rng(0)
    bc2 = 1 - beta2**step
    root_hat = np.concatenate(
        [
            EPS * np.array([0.99, 0.995, 0.999]),
            EPS * np.array([1.001, 1.005, 1.01, 1.05, 2.0]),
            10 ** rng.uniform(-6, -2, 92),
        ]
    )
    v = torch.tensor(root_hat**2 * bc2, dtype=torch.float32)
    m = torch.tensor(rng.standard_normal(100) * 1e-4, dtype=torch.float32)
    return m, v, 3


def reference_adam(
    m: torch.Tensor, v: torch.Tensor, step: int, betas: tuple[float, float], eps: float
) -> tuple[float, float]:
    m64, v64 = m.double().numpy(), v.double().numpy()
    m_hat = m64 / (1 - betas[0] ** step)
    root = np.sqrt(v64 / (1 - betas[1] ** step))
    update = m_hat / (root + eps)
    return float(np.sqrt(np.mean(update**2))), float(np.mean(root < eps))


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_chosen_state_matches_the_reference(kind: type) -> None:
    param = nn.Parameter(torch.zeros(100))
    optimizer = kind([param], lr=1e-3, betas=(0.9, 0.999), eps=EPS)
    m, v, below = chosen_state(step=7)
    optimizer.state[param] = {"step": torch.tensor(7.0), "exp_avg": m, "exp_avg_sq": v}
    rms, dominated = adam_health(optimizer, [param])[:, 0].tolist()
    expected_rms, expected_dominated = reference_adam(m, v, 7, (0.9, 0.999), EPS)
    assert expected_dominated == below / 100
    assert dominated == pytest.approx(expected_dominated, rel=1e-6)  # float32 of 3/100
    assert rms == pytest.approx(expected_rms, rel=1e-5)


def test_amsgrad_uses_the_running_maximum() -> None:
    param = nn.Parameter(torch.zeros(100))
    optimizer = torch.optim.Adam([param], eps=EPS, amsgrad=True)
    m, v, _ = chosen_state(step=3)
    optimizer.state[param] = {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": v / 100, "max_exp_avg_sq": v}
    assert adam_health(optimizer, [param])[:, 0].tolist() == pytest.approx(
        reference_adam(m, v, 3, (0.9, 0.999), EPS), rel=1e-5
    )


def _train(
    optimizer_factory, steps: int = 5, seed: int = 0
) -> tuple[nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    """A float64 MLP trained ``steps`` steps; returns the model, optimizer and the last step's
    applied update per parameter divided by the learning rate."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    optimizer = optimizer_factory(model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        inputs = torch.randn(32, 6, dtype=torch.float64)
        nn.functional.mse_loss(model(inputs), inputs[:, :2].sin()).backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    return model, optimizer, [(b - p.detach()) / lr for b, p in zip(before, model.parameters(), strict=True)]


@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, foreach=False),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=True),
        lambda ps: torch.optim.NAdam(ps, lr=1e-2),
        lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        lambda ps: torch.optim.RAdam(ps, lr=1e-2),
        lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1),
    ],
    ids=[
        "adam",
        "adamw-single-tensor",
        "adam-amsgrad-foreach",
        "nadam",
        "nadam-decoupled",
        "radam-unrectified",
        "radam-coupled-wd",
    ],
)
def test_rms_is_the_update_the_optimizer_applied(factory) -> None:
    """After a real step, the RMS equals that of (w_before − w_after) / lr (no weight decay on w)."""
    model, optimizer, applied = _train(factory)
    got = adam_health(optimizer, list(model.parameters()))
    decay = (
        optimizer.param_groups[0]["weight_decay"] if optimizer.param_groups[0].get("decoupled_weight_decay") else 0.0
    )
    for i, (param, update) in enumerate(zip(model.parameters(), applied, strict=True)):
        # Decoupled decay moved w by lr·λ·w_before on top: take it out.
        before = param.detach() + update * optimizer.param_groups[0]["lr"]
        update = update - decay * before
        assert got[0, i].item() == pytest.approx(update.square().mean().sqrt().item(), rel=1e-5)


def test_radam_after_warmup_is_rectified() -> None:
    model, optimizer, applied = _train(lambda ps: torch.optim.RAdam(ps, lr=1e-3), steps=12)
    got = adam_health(optimizer, list(model.parameters()))
    for i, update in enumerate(applied):
        assert got[0, i].item() == pytest.approx(update.square().mean().sqrt().item(), rel=1e-5)


def test_fused_and_foreach_adamw_agree() -> None:
    results = []
    for flags in ({"foreach": True}, {"fused": True}):
        model, optimizer, _ = _train(functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01, **flags), steps=4)
        results.append(adam_health(optimizer, list(model.parameters())))
    assert torch.allclose(results[0], results[1], rtol=1e-6, atol=0)
    assert torch.isfinite(results[0]).all()


def test_nan_without_state_and_for_other_optimizers() -> None:
    model = nn.Linear(3, 2)
    fresh = torch.optim.Adam(model.parameters())
    assert torch.isnan(adam_health(fresh, list(model.parameters()))).all()
    assert torch.isnan(adam_health(torch.optim.SGD(model.parameters(), lr=0.1), list(model.parameters()))).all()
    assert torch.isnan(adam_health(None, list(model.parameters()))).all()
    # NAdam with coupled weight decay: the gradient it used included the pre-step weights.
    _, nadam, _ = _train(lambda ps: torch.optim.NAdam(ps, weight_decay=0.1))
    assert torch.isnan(adam_health(nadam, [p for g in nadam.param_groups for p in g["params"]])).all()
    assert adam_health(fresh, []).shape == (2, 0)


def test_chunks_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, _ = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    whole = adam_health(optimizer, list(model.parameters()))
    monkeypatch.setattr(optim_health, "CHUNK", 7)
    assert torch.allclose(adam_health(optimizer, list(model.parameters())), whole, rtol=1e-6)
    assert not math.isnan(whole[1, 0].item())


def test_measuring_changes_neither_state_nor_weights() -> None:
    for factory in (
        lambda ps: torch.optim.AdamW(ps),
        lambda ps: torch.optim.NAdam(ps),
        lambda ps: torch.optim.RAdam(ps),
    ):
        model, optimizer, _ = _train(factory)
        model.float()  # float32 state chunks are the state tensors themselves
        optimizer.state = {
            p: {k: v.float() if v.is_floating_point() and v.dim() else v for k, v in s.items()}
            for p, s in zip(model.parameters(), optimizer.state.values(), strict=True)
        }
        before = {id(p): [v.clone() for v in s.values()] for p, s in optimizer.state.items()}
        weights = [p.detach().clone() for p in model.parameters()]
        adam_health(optimizer, list(model.parameters()))
        for p, s in optimizer.state.items():
            assert all(torch.equal(a, b) for a, b in zip(before[id(p)], s.values(), strict=True))
        assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))


@pytest.mark.parametrize("maximize", [False, True])
def test_nadam_with_coupled_weight_decay_against_a_float64_reimplementation(maximize: bool) -> None:
    """NAdam adds λ·w_before to the gradient: given the weights before the step, the update
    is rebuilt. The re-implementation is checked against the step torch applied, then the
    health numbers against it; 5 elements with w = g = 0 keep v = 0 (ε-dominated)."""
    betas, eps, decay, psi, lr, n = (0.9, 0.999), 1e-8, 0.1, 4e-3, 1e-2, 40
    generator = torch.Generator().manual_seed(1)
    param = nn.Parameter(torch.randn(n, dtype=torch.float64, generator=generator))
    with torch.no_grad():
        param[:5] = 0.0
    optimizer = torch.optim.NAdam(
        [param], lr=lr, betas=betas, eps=eps, weight_decay=decay, momentum_decay=psi, maximize=maximize
    )
    m, v, mu_product = np.zeros(n), np.zeros(n), 1.0
    for t in range(1, 7):
        grad = torch.randn(n, dtype=torch.float64, generator=generator)
        grad[:5] = 0.0
        param.grad = grad.clone()
        before = param.detach().clone()
        optimizer.step()
        g = (-1.0 if maximize else 1.0) * grad.numpy() + decay * before.numpy()
        mu = betas[0] * (1 - 0.5 * 0.96 ** (t * psi))
        mu_next = betas[0] * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        mu_product *= mu
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        root = np.sqrt(v / (1 - betas[1] ** t))
        update = ((1 - mu) / (1 - mu_product) * g + mu_next / (1 - mu_product * mu_next) * m) / (root + eps)
        # torch keeps the product of the μ in a float32 tensor: agreement to about 1e-8.
        np.testing.assert_allclose((before - param.detach()).numpy(), lr * update, rtol=1e-7, atol=1e-10)
    rms, dominated = adam_health(optimizer, [param], before=[before])[:, 0].tolist()
    assert rms == pytest.approx(float(np.sqrt(np.mean(update**2))), rel=1e-5)
    assert float(np.mean(root < eps)) == 5 / n
    assert dominated == pytest.approx(5 / n, rel=1e-6)
    # Without the weights before the step the update cannot be rebuilt.
    assert torch.isnan(adam_health(optimizer, [param])).all()


def test_the_watcher_reports_nadam_with_coupled_weight_decay(tmp_path) -> None:
    """Through numwatch.watch: the sampled step's snapshot rebuilds the gradient NAdam used;
    the recorded RMS equals that of the step it applied, (w_before − w_after) / lr."""
    import numwatch
    from tests.support.watch_helpers import read_spool

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.NAdam(model.parameters(), lr=1e-2, weight_decay=0.1)
    applied = {}
    with numwatch.watch(model, optimizer, run="nadam", spool_dir=tmp_path, histogram_every=2) as watcher:
        for step in range(1, 5):
            inputs = torch.randn(32, 6)
            nn.functional.mse_loss(model(inputs), inputs[:, :2].sin()).backward()
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            applied[step] = [
                ((b - p.detach()) / 1e-2).double().square().mean().sqrt().item()
                for b, p in zip(before, model.parameters(), strict=True)
            ]
    spooled = read_spool(watcher.spool_dir)
    sampled = [s for s in spooled.steps if "adam_update_rms" in s["tensors"]]
    assert [s["step"] for s in sampled] == [1, 3]
    for step in sampled:
        np.testing.assert_allclose(spooled.stat(step, "adam_update_rms"), applied[step["step"]], rtol=2e-5)
