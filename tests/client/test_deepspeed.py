"""DeepSpeed ZeRO 1/2/3 on CPU with gloo, two spawned ranks, every scenario in one process group.

Starting DeepSpeed costs seconds per process, so one spawned group runs every scenario of
this module and saves what each rank saw; the tests below read those results. Every number
numwatch spooled is checked against DeepSpeed's own: ``safe_get_full_grad`` (the full
reduced gradient, gathered with a collective per tensor, divided by the loss scale here),
``get_global_grad_norm()``, the loss scale and ``was_step_applied()``, and against a plain
torch model trained on the combined batch of both ranks in float32 (rank 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from numwatch import protocol
from tests.support.deepspeed_ranks import WORLD_SIZE, init_deepspeed, run_rank, spawn, zero_config
from tests.support.watch_helpers import Spooled, read_spool

BATCH = 8  # the combined batch of both ranks
STEPS = 4
CLIP = 1.0  # below every step's norm (the targets are large): every applied step is clipped
HISTOGRAM_EVERY = 2  # steps 1 and 3 are sampled
OVERFLOW_STEPS = (3, 4)  # fp16: an Inf in rank 1's batch; hysteresis 2 skips step 3 and backs off at step 4
STAGES = (1, 2, 3)
DTYPES = ("fp32", "bf16", "fp16")
LR = 1e-2
SHAPES = [(17, 6), (17,), (3, 17), (3,)]
# Per-tensor norms equal DeepSpeed's gathered gradient's up to float32 rounding; the float32
# reference's only for fp32 (bf16 and fp16 train on rounded weights and activations).
RTOL = 1e-5
REFERENCE_RTOL = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 5e-3}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: ZeRO's partitions cut tensors at uneven places.
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(BATCH, 6, generator=generator)
    inputs[:, 0] = 0.0  # column 0 of the first weight's gradient is exactly zero: 17 known zeros
    return inputs, 20.0 * torch.randn(BATCH, 3, generator=generator)


def _half(rank: int, tensor: torch.Tensor) -> torch.Tensor:
    half = BATCH // WORLD_SIZE
    return tensor[rank * half : (rank + 1) * half]


def _engine(deepspeed: Any, stage: int, dtype: str, **extra: Any) -> Any:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    config = zero_config(stage, dtype, micro_batch=BATCH // WORLD_SIZE, gradient_clipping=CLIP, **extra)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _full(tensor: torch.Tensor | None) -> np.ndarray:
    assert tensor is not None
    return tensor.detach().double().numpy().ravel()


def _deepspeed_step(deepspeed: Any, engine: Any, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """One training step on this rank's half of the batch; what DeepSpeed itself says about it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    dtype = next(engine.module.parameters()).dtype
    loss = torch.nn.functional.mse_loss(engine(inputs.to(dtype)), targets.to(dtype))
    engine.backward(loss)
    scale = float(engine.optimizer.loss_scale)
    # Collectives, in the same order on every rank; still loss-scaled under fp16.
    grads = [_full(safe_get_full_grad(p)) / scale for p in engine.module.parameters()]
    engine.step()
    weights = [_full(safe_get_full_fp32_param(p).to(dtype)) for p in engine.module.parameters()]
    adam = [
        {key: _full(deepspeed.utils.safe_get_full_optimizer_state(p, key)) for key in ("exp_avg", "exp_avg_sq")}
        for p in engine.module.parameters()
    ]
    return {
        "loss": float(loss),
        "grads": grads,
        "scale": scale,
        "new_scale": float(engine.optimizer.loss_scale),
        "global_norm": float(engine.get_global_grad_norm()),
        "applied": bool(engine.was_step_applied()),
        "weights": weights,
        "adam": adam,
    }


def _reference_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, applied: bool) -> dict:
    """The same step in float32 on the combined batch (the mean loss: the averaged gradient)."""
    inputs, targets = _batch(step)
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    grads = [_full(p.grad) for p in model.parameters()]
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    if applied:
        optimizer.step()
    optimizer.zero_grad()
    return {"loss": float(loss), "grads": grads, "global_norm": norm}


def _configurations(deepspeed: Any, rank: int, spool: str) -> dict[str, Any]:
    """Every stage × dtype, watched with watch(engine), against DeepSpeed and the reference."""
    import numwatch

    results: dict[str, Any] = {}
    for stage in STAGES:
        for dtype in DTYPES:
            engine = _engine(deepspeed, stage, dtype)
            watcher = numwatch.watch(
                engine,
                run=f"zero{stage}-{dtype}",
                spool_dir=spool,
                format_every=1,
                histogram_every=HISTOGRAM_EVERY,
                quant_every=2,
            )
            reference = _model() if rank == 0 else None
            reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR) if reference else None
            seen: dict[str, list] = {"deepspeed": [], "reference": []}
            for step in range(1, STEPS + 1):
                inputs, targets = _batch(step)
                inputs = _half(rank, inputs).clone()
                if dtype == "fp16" and step in OVERFLOW_STEPS and rank == 1:
                    inputs[0, 1] = math.inf
                said = _deepspeed_step(deepspeed, engine, inputs, _half(rank, targets))
                seen["deepspeed"].append(said)
                if reference is not None:
                    seen["reference"].append(_reference_step(reference, reference_optimizer, step, said["applied"]))
            watcher.close()
            results[f"zero{stage}-{dtype}"] = seen
    return results


def _refusals(deepspeed: Any, spool: str) -> dict[str, str]:
    """What watch() said to each setup it must refuse."""
    import numwatch

    said = {}
    setups: dict[str, tuple[int, str, dict[str, Any]]] = {}
    for name, (stage, dtype, extra) in setups.items():
        engine = _engine(deepspeed, stage, dtype, **extra)
        try:
            numwatch.watch(engine, run=f"refused-{name}", spool_dir=spool).close()
            said[name] = "accepted"
        except numwatch.UnsupportedConfiguration as refusal:
            said[name] = str(refusal)
    return said


def _ranks(rank: int, port: int, out: str) -> None:
    def body() -> None:
        deepspeed = init_deepspeed(rank, port)
        results = {"configurations": _configurations(deepspeed, rank, out), "refusals": _refusals(deepspeed, out)}
        torch.save(results, Path(out) / f"rank{rank}.pt")

    run_rank(body)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("deepspeed")
    spawn(_ranks, str(out))
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _spooled(out: Path, run: str, rank: int) -> Spooled:
    (directory,) = out.glob(f"{run}.*")  # both ranks are one instance
    return read_spool(directory / f"rank{rank}")


def _float(value: Any) -> float:
    decoded = protocol.decode_float(value)
    assert decoded is not None
    return decoded


def _configuration_runs(ranks: tuple[Path, list[dict[str, Any]]]):
    out, results = ranks
    for stage in STAGES:
        for dtype in DTYPES:
            run = f"zero{stage}-{dtype}"
            reference = results[0]["configurations"][run]["reference"]
            for rank in range(WORLD_SIZE):
                yield dtype, _spooled(out, run, rank), results[rank]["configurations"][run]["deepspeed"], reference


def _overflowed(dtype: str, step: int) -> bool:
    return dtype == "fp16" and step in OVERFLOW_STEPS


def test_per_tensor_gradient_statistics_are_the_full_reduced_unscaled_gradient(ranks) -> None:
    for dtype, spooled, deepspeed, reference in _configuration_runs(ranks):
        assert [t["shape"] for t in spooled.runs[0]["tensors"]] == [list(s) for s in SHAPES]
        assert [s["step"] for s in spooled.steps] == list(range(1, STEPS + 1))
        for step, said, expected in zip(spooled.steps, deepspeed, reference, strict=True):
            norms = np.array([np.linalg.norm(g) for g in said["grads"]])
            absmax = np.array([np.abs(g).max() for g in said["grads"]])
            nan = [int(np.isnan(g).sum()) for g in said["grads"]]
            inf = [int(np.isinf(g).sum()) for g in said["grads"]]
            if _overflowed(dtype, step["step"]):
                np.testing.assert_array_equal(spooled.stat(step, "nan_count"), nan)
                np.testing.assert_array_equal(spooled.stat(step, "inf_count"), inf)
                assert sum(nan) + sum(inf) > 0
                continue
            np.testing.assert_allclose(spooled.stat(step, "grad_norm"), norms, rtol=RTOL)
            np.testing.assert_allclose(spooled.stat(step, "grad_absmax"), absmax, rtol=RTOL)
            np.testing.assert_array_equal(spooled.stat(step, "zeros"), [int((g == 0).sum()) for g in said["grads"]])
            assert spooled.stat(step, "zeros")[0] >= 17
            reference_norms = [np.linalg.norm(g) for g in expected["grads"]]
            np.testing.assert_allclose(spooled.stat(step, "grad_norm"), reference_norms, rtol=REFERENCE_RTOL[dtype])


def test_global_norm_loss_scale_skips_and_clipping_are_deepspeeds(ranks) -> None:
    for dtype, spooled, deepspeed, reference in _configuration_runs(ranks):
        for step, said, expected in zip(spooled.steps, deepspeed, reference, strict=True):
            overflowed = _overflowed(dtype, step["step"])
            assert step["skipped"] is overflowed is not said["applied"]
            assert _float(step["loss"]) == pytest.approx(said["loss"], rel=1e-6, nan_ok=True)
            if dtype == "fp16":
                assert (_float(step["loss_scale"]), _float(step["new_loss_scale"])) == (
                    said["scale"],
                    said["new_scale"],
                )
            else:
                assert step["loss_scale"] is None
            if overflowed:
                assert not math.isfinite(_float(step["global_grad_norm"]))
                assert step["clip_coef"] is None and step["clipped"] is False
                continue
            assert _float(step["global_grad_norm"]) == pytest.approx(said["global_norm"], rel=RTOL)
            assert _float(step["global_grad_norm"]) == pytest.approx(expected["global_norm"], rel=REFERENCE_RTOL[dtype])
            coefficient = min(1.0, CLIP / (said["global_norm"] + 1e-6))
            assert _float(step["clip_coef"]) == pytest.approx(coefficient, rel=RTOL)
            assert step["clipped"] is True
            assert _float(step["post_clip_grad_norm"]) == pytest.approx(CLIP, rel=1e-5)
        if dtype == "fp16":
            # Hysteresis 2: the first overflow is skipped at the same scale, the second backs off.
            third, fourth = deepspeed[2], deepspeed[3]
            assert third["new_scale"] == third["scale"] and fourth["new_scale"] == fourth["scale"] / 2
