"""DeepSpeed ZeRO 1/2/3 on CPU with gloo, two spawned ranks, every scenario in one process group.

Starting DeepSpeed costs seconds per process, so one spawned group runs every scenario of
this module and saves what each rank saw; the tests below read those results. Every number
numwatch spooled is checked against DeepSpeed's own: ``safe_get_full_grad`` (the full
reduced gradient, gathered with a collective per tensor, divided by the loss scale here),
``get_global_grad_norm()``, the loss scale and ``was_step_applied()``, and against a plain
torch model trained on the combined batch of both ranks in float32 (on each rank, which
also gives that rank's own gradient before the reduction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from numwatch import protocol
from tests.support.collector_docs import values
from tests.support.deepspeed_ranks import WORLD_SIZE, init_deepspeed, run_rank, spawn, zero_config
from tests.support.watch_helpers import Spooled, read_spool

BATCH = 8  # the combined batch of both ranks
STEPS = 4
CLIP = 1.0  # below every step's norm (the targets are large): every applied step is clipped
HISTOGRAM_EVERY = 2  # steps 1 and 3 are sampled
OVERFLOW_STEPS = (3, 4)
NONFINITE_DTYPES = (
    "fp32",
    "bf16",
    "bf16-unchecked",
)  # fp16: an Inf in rank 1's batch; hysteresis 2 skips step 3 and backs off at step 4
STAGES = (1, 2, 3)
DTYPES = ("fp32", "bf16", "fp16")
LR = 1e-2
SHAPES = [(17, 6), (17,), (4, 17), (4,)]
QUANT_EVERY = 2  # steps 2 and 4 measure the weights' quantization SQNR
# Per-tensor norms equal DeepSpeed's gathered gradient's up to float32 rounding; the float32
# reference's only for fp32 (bf16 and fp16 train on rounded weights and activations).
RTOL = 1e-5
REFERENCE_RTOL = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 5e-3}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: ZeRO's partitions cut tensors at uneven places. Under stages 1 and 2 the
    # first weight is split between the ranks on a row boundary (whole rows: int8 and int4
    # combine), under stage 3 at element 51 (inside a row: they report NaN).
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(BATCH, 6, generator=generator)
    inputs[:, 0] = 0.0  # column 0 of the first weight's gradient is exactly zero: 17 known zeros
    return inputs, 20.0 * torch.randn(BATCH, 4, generator=generator)


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


def _deepspeed_step(
    deepspeed: Any, engine: Any, inputs: torch.Tensor, targets: torch.Tensor, gather: bool = True
) -> dict[str, Any]:
    """One training step on this rank's half of the batch; what DeepSpeed itself says about it
    (``gather``: with the full gradients)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    dtype = next(engine.module.parameters()).dtype
    loss = torch.nn.functional.mse_loss(engine(inputs.to(dtype)), targets.to(dtype))
    engine.backward(loss)
    scale = float(engine.optimizer.loss_scale)
    # Collectives, in the same order on every rank; still loss-scaled under fp16.
    grads = [_full(safe_get_full_grad(p)) / scale for p in engine.module.parameters()] if gather else []
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


def _reference_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, applied: bool, rank: int
) -> dict:
    """The same step in float32 on the combined batch (the mean loss: the averaged gradient);
    ``local_norm``: the norm of the gradient of ``rank``'s own half, before any reduction."""
    inputs, targets = _batch(step)
    own = torch.nn.functional.mse_loss(model(_half(rank, inputs)), _half(rank, targets))
    local = torch.autograd.grad(own, list(model.parameters()))
    local_norm = float(np.linalg.norm(np.concatenate([_full(g) for g in local])))
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    grads = [_full(p.grad) for p in model.parameters()]
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    if applied:
        optimizer.step()
    optimizer.zero_grad()
    return {"loss": float(loss), "grads": grads, "global_norm": norm, "local_norm": local_norm}


def _count_collectives() -> list[int]:
    """Counts, per step (append a 0 to start one), the all-reduces numwatch's reductions issue."""
    from numwatch.kernels.sharded import ShardReduction

    counts: list[int] = []
    original = ShardReduction._all_reduce

    def counted(self: ShardReduction, parts: list[torch.Tensor], op: Any) -> list[torch.Tensor]:
        if counts:
            counts[-1] += bool(parts)
        return original(self, parts, op)

    ShardReduction._all_reduce = counted  # type: ignore[method-assign]  # this process only
    return counts


def _configurations(deepspeed: Any, rank: int, spool: str) -> dict[str, Any]:
    """Every stage × dtype, watched with watch(engine), against DeepSpeed and the reference."""
    import numwatch

    results: dict[str, Any] = {}
    collectives = _count_collectives()
    for stage in STAGES:
        for dtype in DTYPES:
            engine = _engine(deepspeed, stage, dtype)
            watcher = numwatch.watch(
                engine,
                run=f"zero{stage}-{dtype}",
                spool_dir=spool,
                format_every=1,
                histogram_every=HISTOGRAM_EVERY,
                quant_every=QUANT_EVERY,
            )
            reference = _model()
            reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR)
            seen: dict[str, list] = {"deepspeed": [], "reference": [], "collectives": collectives}
            collectives.clear()
            for step in range(1, STEPS + 1):
                collectives.append(0)
                inputs, targets = _batch(step)
                inputs = _half(rank, inputs).clone()
                if dtype == "fp16" and step in OVERFLOW_STEPS and rank == 1:
                    inputs[0, 1] = math.inf
                said = _deepspeed_step(deepspeed, engine, inputs, _half(rank, targets))
                seen["deepspeed"].append(said)
                seen["reference"].append(_reference_step(reference, reference_optimizer, step, said["applied"], rank))
            watcher.close()
            seen["collectives"] = list(collectives)
            results[f"zero{stage}-{dtype}"] = seen
    collectives.clear()
    return results


def _own_gradient_norm(
    weights: list[torch.Tensor], rank: int, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """float64 norm of ``rank``'s own gradient summed over ``batches`` (each loss / their count, as the
    engine differentiates it), at ``weights``, in a float32 copy of the model."""
    model = _model()
    with torch.no_grad():
        for parameter, weight in zip(model.parameters(), weights, strict=True):
            parameter.copy_(weight.view_as(parameter))
    total = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for inputs, targets in batches:
        loss = torch.nn.functional.mse_loss(model(_half(rank, inputs)), _half(rank, targets)) / len(batches)
        for sum_, grad in zip(total, torch.autograd.grad(loss, list(model.parameters())), strict=True):
            sum_ += grad.double()
    return float(torch.linalg.vector_norm(torch.cat([t.ravel() for t in total])))


def _train(engine: Any, steps: int, rank: int, accumulation: int = 1, own: bool = False) -> list[dict[str, Any]]:
    """``steps`` optimizer steps of ``accumulation`` micro-batches each; DeepSpeed's norm, the
    gathered gradients and the losses backpropagated, per optimizer step (``own``: and the
    norm of this rank's own gradient before the reduction, from a float32 copy)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    seen = []
    for step in range(1, steps + 1):
        losses = []
        # Collectives, in the same order on every rank.
        weights = [safe_get_full_fp32_param(p) for p in engine.module.parameters()] if own else []
        for micro in range(accumulation):
            inputs, targets = _batch(10 * step + micro)
            loss = torch.nn.functional.mse_loss(engine(_half(rank, inputs)), _half(rank, targets))
            engine.backward(loss)
            losses.append(float(loss))
            if micro < accumulation - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        grads = [_full(safe_get_full_grad(p)) for p in engine.module.parameters()]
        engine.step()
        seen.append({"global_norm": float(engine.get_global_grad_norm()), "grads": grads, "losses": losses})
        if own:
            batches = [_batch(10 * step + micro) for micro in range(accumulation)]
            seen[-1]["own_norm"] = _own_gradient_norm(weights, rank, batches)
    return seen


def _accumulation(deepspeed: Any, rank: int, spool: str) -> dict[str, Any]:
    """gradient_accumulation_steps 2 in every stage: one numwatch step per optimizer step."""
    import numwatch

    results = {}
    for stage in STAGES:
        engine = _engine(deepspeed, stage, "fp32", gradient_accumulation_steps=2)
        with numwatch.watch(engine, run=f"accumulation{stage}", spool_dir=spool) as watcher:
            results[stage] = _train(engine, 2, rank, accumulation=2, own=True)
        results[f"{stage}-steps"] = watcher.steps
    return results


# ZeRO settings that change where the partitions' gradients live, as configs in use set them.
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "zero2-overlap": (2, {"overlap_comm": True}),
    # bf16 weights, fp32 gradient accumulation: ZeRO-2 keeps one compact fp32 partition buffer.
    "zero2-bf16-fp32-accumulation": (2, {}),
    # DeepSpeed's fragment API (safe_get_full_grad, _fp32_param, _optimizer_state) picks another
    # parameter's values here: compared with zero2-overlap, the same training, instead.
    "zero2-round-robin": (2, {"round_robin_gradients": True}),
    "zero2-allreduce": (2, {"reduce_scatter": False, "contiguous_gradients": False}),
    "zero1-allreduce": (1, {"reduce_scatter": False}),
    "zero3-sub-groups": (3, {"sub_group_size": 64, "overlap_comm": False}),
}


def _variants(deepspeed: Any, rank: int, spool: str) -> dict[str, list[dict[str, Any]]]:
    """Two steps of each ZeRO variant (fp32, histograms on both: Adam health too)."""
    import numwatch

    results = {}
    for name, (stage, zero) in VARIANTS.items():
        if "bf16" in name:
            engine = _engine(deepspeed, stage, "bf16", data_types={"grad_accum_dtype": "fp32"})
        else:
            engine = _engine(deepspeed, stage, "fp32", zero_optimization=zero)
        with numwatch.watch(engine, run=name, spool_dir=spool, histogram_every=1):
            results[name] = [
                _deepspeed_step(deepspeed, engine, *(_half(rank, t) for t in _batch(step)), gather="round" not in name)
                for step in (1, 2)
            ]
    return results


def _growth(deepspeed: Any, rank: int, spool: str) -> dict[int, list[dict[str, Any]]]:
    """fp16 with the loss scale doubling after every 2 good steps: step 3 grows it."""
    import numwatch

    results = {}
    for stage in STAGES:
        engine = _engine(deepspeed, stage, "fp16", fp16={"loss_scale_window": 2})
        with numwatch.watch(engine, run=f"growth{stage}", spool_dir=spool):
            results[stage] = [
                _deepspeed_step(deepspeed, engine, *(_half(rank, t) for t in _batch(step))) for step in range(1, 4)
            ]
    return results


def _nonfinite(deepspeed: Any, rank: int, spool: str) -> dict[str, list[dict[str, Any]]]:
    """fp32 and bf16: an Inf in rank 1's batch at step 2 (DeepSpeed skips the step, or not)."""
    import numwatch

    results = {}
    for stage in STAGES:
        for dtype in NONFINITE_DTYPES:
            unchecked = {"bf16": {"check_grad_overflow": False}} if dtype == "bf16-unchecked" else {}
            engine = _engine(deepspeed, stage, dtype.split("-")[0], **unchecked)
            with numwatch.watch(engine, run=f"nonfinite{stage}-{dtype}", spool_dir=spool):
                seen = []
                for step in (1, 2):
                    inputs, targets = (_half(rank, t).clone() for t in _batch(step))
                    if step == 2 and rank == 1:
                        inputs[0, 1] = math.inf
                    seen.append(_deepspeed_step(deepspeed, engine, inputs, targets))
            results[f"{stage}-{dtype}"] = seen
    return results


def _unwrapped(deepspeed: Any, rank: int, spool: str) -> dict[str, Any]:
    """watch(engine.module, engine.optimizer), accepted and wrong before, against watch(engine)
    on an identical engine trained identically."""
    from deepspeed.utils import safe_get_full_fp32_param

    import numwatch

    results = {}
    for stage in STAGES:
        for form in ("engine", "unwrapped", "unwatched"):
            engine = _engine(deepspeed, stage, "fp32")
            watched = (engine,) if form == "engine" else (engine.module, engine.optimizer)
            with (
                numwatch.watch(*watched, run=f"{form}{stage}", spool_dir=spool)
                if form != "unwatched"
                else nullcontext()
            ):
                results[f"{form}{stage}"] = _train(engine, 2, rank)
            results[f"{form}{stage}-weights"] = [_full(safe_get_full_fp32_param(p)) for p in engine.module.parameters()]
            patched = [n for n in ("step", "_update_scale") if n in vars(engine.optimizer)]
            results[f"{form}{stage}-left"] = patched + [n for n in ("backward", "scale") if n in vars(engine)]
    return results


def _refusals(deepspeed: Any, spool: str) -> dict[str, str]:
    """What watch() said to each DeepSpeed setup it must refuse: the refusal, or "accepted".
    Setups that need hardware or ops this machine lacks (NVMe, expert or tensor parallelism,
    ...) are a real engine with that part of its configuration or state set afterwards: what
    the refusal reads."""
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

    import numwatch

    def fresh(stage: int = 2) -> Any:
        return _engine(deepspeed, stage, "fp32")

    def nvme() -> Any:
        engine = fresh(3)
        engine._config.zero_config.offload_optimizer = DeepSpeedZeroOffloadOptimizerConfig(
            device="nvme", nvme_path="/x"
        )
        return engine

    def changed(stage: int, change: Callable[[Any], None]) -> Callable[[], Any]:
        def make() -> Any:
            engine = fresh(stage)
            change(engine)
            return engine

        return make

    singles = [torch.distributed.new_group([rank]) for rank in range(WORLD_SIZE)]  # every rank creates every group
    mine = singles[torch.distributed.get_rank()]
    setups: dict[str, Callable[[], Any]] = {
        "stage0": lambda: _engine(deepspeed, 0, "fp32"),
        "stage0-fp16": lambda: _engine(deepspeed, 0, "fp16"),
        "bf16-fp32-accumulation": lambda: _engine(deepspeed, 1, "bf16", data_types={"grad_accum_dtype": "fp32"}),
        "offload-optimizer": lambda: _engine(
            deepspeed,
            2,
            "fp32",
            zero_optimization={"offload_optimizer": {"device": "cpu"}},
            zero_force_ds_cpu_optimizer=False,
        ),
        "offload-param": lambda: _engine(deepspeed, 3, "fp32", zero_optimization={"offload_param": {"device": "cpu"}}),
        "hpz": lambda: _engine(deepspeed, 3, "fp32", zero_optimization={"zero_hpz_partition_size": 2}),
        "autocast": lambda: _engine(deepspeed, 2, "fp32", torch_autocast={"enabled": True, "dtype": "bfloat16"}),
        "nvme": nvme,
        "moe": changed(2, lambda engine: setattr(engine, "has_moe_layers", True)),
        "tensor-parallel": changed(3, lambda engine: setattr(engine, "mpu", object())),
        "zenflow": changed(2, lambda engine: setattr(engine, "zenflow", True)),
        "deepcompile": changed(3, lambda engine: setattr(engine, "is_deepcompile_active", lambda: True)),
        "muon": changed(2, lambda engine: engine.optimizer.param_groups[0].update(use_muon=True)),
        "smaller-group": changed(2, lambda engine: setattr(engine.optimizer, "real_dp_process_group", [mine])),
    }
    said = {}
    for name, make in setups.items():
        engine = make()
        for form, watched in (("", (engine,)), ("-unwrapped", (engine.module, engine.optimizer))):
            try:
                numwatch.watch(*watched, run=f"refused-{name}", spool_dir=spool).close()
                said[name + form] = "accepted"
            except numwatch.UnsupportedConfiguration as refusal:
                said[name + form] = str(refusal)
    try:
        _engine(deepspeed, 3, "fp32", zero_optimization={"mics_shard_size": 1})
        said["mics"] = "configured"
    except Exception as error:  # DeepSpeed itself removed MiCS
        said["mics"] = str(error)
    # Last: a pipeline engine leaves DeepSpeed's model-parallel state set for later engines.
    stages = deepspeed.pipe.PipelineModule(layers=list(_model()), num_stages=WORLD_SIZE, loss_fn=torch.nn.MSELoss())
    config = zero_config(1, "fp32", micro_batch=BATCH // WORLD_SIZE)
    pipeline, *_ = deepspeed.initialize(model=stages, optimizer=torch.optim.AdamW(stages.parameters()), config=config)
    try:
        numwatch.watch(pipeline, run="refused-pipeline", spool_dir=spool).close()
        said["pipeline"] = "accepted"
    except numwatch.UnsupportedConfiguration as refusal:
        said["pipeline"] = str(refusal)
    return said


def _ranks(rank: int, port: int, out: str) -> None:
    def body() -> None:
        deepspeed = init_deepspeed(rank, port)
        results = {
            "configurations": _configurations(deepspeed, rank, out),
            "accumulation": _accumulation(deepspeed, rank, out),
            "growth": _growth(deepspeed, rank, out),
            "variants": _variants(deepspeed, rank, out),
            "nonfinite": _nonfinite(deepspeed, rank, out),
            "unwrapped": _unwrapped(deepspeed, rank, out),
            "refusals": _refusals(deepspeed, out),
        }
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
        assert [t["group"] for t in spooled.runs[0]["tensors"]] == [0] * len(SHAPES)
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


def _sampled(spooled: Spooled) -> list[dict[str, Any]]:
    return [s for s in spooled.steps if (s["step"] - 1) % HISTOGRAM_EVERY == 0]


def test_sampled_weight_statistics_and_histograms_cover_the_whole_tensors(ranks) -> None:
    numels = [math.prod(shape) for shape in SHAPES]
    for _, spooled, deepspeed, _ in _configuration_runs(ranks):
        assert [s["step"] for s in _sampled(spooled)] == [1, 3]
        for step in _sampled(spooled):
            weights = deepspeed[step["step"] - 1]["weights"]  # after that step's update
            np.testing.assert_allclose(
                spooled.stat(step, "weight_norm"), [np.linalg.norm(w) for w in weights], rtol=RTOL
            )
            np.testing.assert_allclose(
                spooled.stat(step, "weight_absmax"), [np.abs(w).max() for w in weights], rtol=RTOL
            )
        assert {(h["step"], h["kind"]) for h in spooled.histograms} == {
            (1, "grad"),
            (1, "weight"),
            (3, "grad"),
            (3, "weight"),
        }
        for histogram in spooled.histograms:
            exponent = values(histogram["exponent"], "<i8").reshape(len(SHAPES), -1)
            linear = values(histogram["linear"], "<i8").reshape(len(SHAPES), -1)
            # Every element of every whole tensor is counted exactly once, in both histograms.
            np.testing.assert_array_equal(exponent.sum(axis=1), numels)
            if histogram["kind"] == "weight":
                np.testing.assert_array_equal(linear.sum(axis=1), numels)
                weights = deepspeed[histogram["step"] - 1]["weights"]
                np.testing.assert_allclose(
                    values(histogram["linear_min"], "<f4"), [w.min() for w in weights], rtol=RTOL
                )
                np.testing.assert_allclose(
                    values(histogram["linear_max"], "<f4"), [w.max() for w in weights], rtol=RTOL
                )


def _adam_reference(state: dict[str, np.ndarray], t: int) -> tuple[float, float]:
    """float64 AdamW health from the full moments after ``t`` updates (torch's defaults)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    root = np.sqrt(state["exp_avg_sq"] / (1 - beta2**t))
    update = state["exp_avg"] / (1 - beta1**t) / (root + eps)
    return float(np.sqrt(np.mean(update**2))), float(np.mean(root < eps))


def test_adam_health_is_read_from_deepspeeds_fp32_optimizer_state(ranks) -> None:
    for _, spooled, deepspeed, _ in _configuration_runs(ranks):
        for step in _sampled(spooled):
            updates = sum(said["applied"] for said in deepspeed[: step["step"]])
            state = deepspeed[step["step"] - 1]["adam"]
            expected = np.array([_adam_reference(tensor, updates) for tensor in state]).T
            np.testing.assert_allclose(spooled.stat(step, "adam_update_rms"), expected[0], rtol=1e-4)
            np.testing.assert_allclose(spooled.stat(step, "adam_eps_dominated"), expected[1], atol=1e-7)


def test_quantization_sqnr_is_the_whole_tensors_or_nan_where_a_partition_cuts_a_row(ranks) -> None:
    from numwatch.kernels.quantization import quantization_sqnr

    measured = set()
    for _, spooled, deepspeed, _ in _configuration_runs(ranks):
        steps = [s for s in spooled.steps if s["step"] % QUANT_EVERY == 0]
        assert [s["step"] for s in steps] == [2, 4]
        for step in steps:
            weights = [
                torch.from_numpy(w).float().reshape(shape)
                for w, shape in zip(deepspeed[step["step"] - 1]["weights"], SHAPES, strict=True)
            ]
            expected = quantization_sqnr(weights).numpy()
            for row, scheme in enumerate(protocol.QUANT_SCHEMES):
                got = spooled.stat(step, protocol.QUANT_SQNR_STATS[scheme])
                for tensor, (value, reference) in enumerate(zip(got, expected[row], strict=True)):
                    if len(SHAPES[tensor]) < 2:
                        assert np.isnan(value)
                    elif not np.isnan(value):
                        assert value == pytest.approx(reference, rel=1e-4)
                        measured.add((scheme, tensor))
                    else:
                        assert scheme != "fp8", "fp8 scales by the global abs-max: always measured"
    # Whole rows split between the ranks (stages 1 and 2) and one rank's whole tensor combine.
    assert {("int8", 0), ("int4", 0), ("int8", 2), ("nf4", 2), ("fp8", 0)} <= measured


def test_one_sum_and_one_max_per_step(ranks) -> None:
    _, results = ranks
    for rank_results in results:
        for run, seen in rank_results["configurations"].items():
            # Step 2 (not sampled, finite): the norms and format counts of every tensor in one
            # SUM, their abs-maxima in one MAX; then the weights' quantization (a MAX and its
            # NaN flags' SUM, then one SUM of the squared norms).
            assert seen["collectives"][1] == 2 + 3, run


def test_each_ranks_local_health_is_its_own_gradient_before_the_reduction(ranks) -> None:
    out, results = ranks
    for stage in STAGES:
        for dtype in DTYPES:
            run = f"zero{stage}-{dtype}"
            checksums: dict[int, set[int | None]] = {}
            for rank in range(WORLD_SIZE):
                spooled = _spooled(out, run, rank)
                reference = results[rank]["configurations"][run]["reference"]
                for step, expected in zip(spooled.steps, reference, strict=True):
                    local = step["local"]
                    assert local["compute_time"] is None  # ZeRO's collectives run inside forward and backward
                    sampled = (step["step"] - 1) % HISTOGRAM_EVERY == 0
                    if stage < 3 and sampled:
                        checksums.setdefault(step["step"], set()).add(local["checksum"])
                    else:
                        assert local["checksum"] is None
                    if _overflowed(dtype, step["step"]) and rank == 1:  # the Inf was in rank 1's batch only
                        assert local["nonfinite"] > 0 and not math.isfinite(_float(local["grad_norm"]))
                        continue
                    assert local["nonfinite"] == 0, (run, rank, step["step"])
                    assert _float(local["grad_norm"]) == pytest.approx(
                        expected["local_norm"], rel=REFERENCE_RTOL[dtype]
                    ), (run, rank, step["step"])
                    # The rank's own gradient, not the reduced one every rank holds.
                    assert _float(local["grad_norm"]) != pytest.approx(expected["global_norm"], rel=1e-2)
            # Stages 1 and 2: each sampled step's weights are the same on both ranks.
            assert all(len(sums) == 1 and None not in sums for sums in checksums.values()), (run, checksums)
            assert sorted(checksums) == ([1, 3] if stage < 3 else [])


def test_gradient_accumulation_gives_one_step_per_optimizer_step(ranks) -> None:
    out, results = ranks
    for stage in STAGES:
        for rank in range(WORLD_SIZE):
            said = results[rank]["accumulation"][stage]
            spooled = _spooled(out, f"accumulation{stage}", rank)
            assert results[rank]["accumulation"][f"{stage}-steps"] == 2
            assert [s["step"] for s in spooled.steps] == [1, 2]
            for step, expected in zip(spooled.steps, said, strict=True):
                if stage == 1:  # the rank's own gradient, summed over its two micro-batches
                    own = _float(step["local"]["grad_norm"])
                    assert own == pytest.approx(expected["own_norm"], rel=RTOL), (stage, rank)
                    assert own != pytest.approx(expected["global_norm"], rel=1e-2)
                    assert step["local"]["nonfinite"] == 0
                else:  # ZeRO-2/3 reduce every micro-batch: the rank's own sum over them is never held
                    assert step["local"] is None
                # The loss whose gradient the step applies: each micro-batch's loss / 2, summed.
                assert _float(step["loss"]) == pytest.approx(sum(expected["losses"]) / 2, rel=1e-6)
                assert _float(step["global_grad_norm"]) == pytest.approx(expected["global_norm"], rel=RTOL)
                np.testing.assert_allclose(
                    spooled.stat(step, "grad_norm"), [np.linalg.norm(g) for g in expected["grads"]], rtol=RTOL
                )


def test_non_finite_gradients_in_fp32_and_bf16_are_counted_and_deepspeeds_skip_recorded(ranks) -> None:
    out, results = ranks
    for stage in STAGES:
        for dtype in NONFINITE_DTYPES:
            for rank in range(WORLD_SIZE):
                spooled = _spooled(out, f"nonfinite{stage}-{dtype}", rank)
                first, second = results[rank]["nonfinite"][f"{stage}-{dtype}"]
                # DeepSpeed skips a non-finite norm, except bf16 with check_grad_overflow off under ZeRO-1/2.
                assert second["applied"] is (dtype == "bf16-unchecked" and stage < 3)
                assert [s["skipped"] for s in spooled.steps] == [False, not second["applied"]]
                grads = second["grads"]
                np.testing.assert_array_equal(
                    spooled.stat(spooled.steps[1], "nan_count"), [np.isnan(g).sum() for g in grads]
                )
                np.testing.assert_array_equal(
                    spooled.stat(spooled.steps[1], "inf_count"), [np.isinf(g).sum() for g in grads]
                )
                assert sum(np.isnan(g).sum() + np.isinf(g).sum() for g in grads) > 0
                assert first["applied"] and not np.isfinite(_float(spooled.steps[1]["global_grad_norm"]))


def test_zero_variants_that_move_the_partitions_give_the_same_definitions(ranks) -> None:
    out, results = ranks
    for name in VARIANTS:
        for rank in range(WORLD_SIZE):
            spooled = _spooled(out, name, rank)
            said = results[rank]["variants"][name]
            gathered = results[rank]["variants"]["zero2-overlap" if "round" in name else name]
            for step, expected, full in zip(spooled.steps, said, gathered, strict=True):
                np.testing.assert_allclose(
                    spooled.stat(step, "grad_norm"), [np.linalg.norm(g) for g in full["grads"]], rtol=RTOL
                )
                assert _float(step["global_grad_norm"]) == pytest.approx(expected["global_norm"], rel=RTOL)
                rms = [_adam_reference(state, step["step"])[0] for state in full["adam"]]
                np.testing.assert_allclose(spooled.stat(step, "adam_update_rms"), rms, rtol=1e-4)
                weights = full["weights"]
                np.testing.assert_allclose(
                    spooled.stat(step, "weight_norm"), [np.linalg.norm(w) for w in weights], rtol=RTOL
                )


def test_a_step_that_grows_the_loss_scale_records_the_true_norm(ranks) -> None:
    # DeepSpeed raises the scale before it unscales: ZeRO-3's get_global_grad_norm() divides
    # by the new scale (half the true norm); stages 1 and 2 divide by the old one. Both clip
    # with the scale they raised, which cancels out when they clip.
    out, results = ranks
    for stage in STAGES:
        for rank in range(WORLD_SIZE):
            spooled = _spooled(out, f"growth{stage}", rank)
            said = results[rank]["growth"][stage]
            assert [(s["scale"], s["new_scale"]) for s in said] == [(4096, 4096), (4096, 4096), (4096, 8192)]
            for step, expected in zip(spooled.steps, said, strict=True):
                true_norm = np.sqrt(sum(np.sum(g**2) for g in expected["grads"]))
                assert _float(step["global_grad_norm"]) == pytest.approx(true_norm, rel=RTOL)
                halved = stage == 3 and expected["new_scale"] > expected["scale"]
                assert expected["global_norm"] == pytest.approx(true_norm / 2 if halved else true_norm, rel=RTOL)
                assert _float(step["post_clip_grad_norm"]) == pytest.approx(CLIP, rel=RTOL)


def test_watching_the_module_and_optimizer_is_watching_the_engine(ranks) -> None:
    # watch(engine.module, engine.optimizer) under ZeRO-1/2 used to be accepted and record each
    # rank's local, unreduced norm (e.g. 2.874 and 6.806 where DeepSpeed's was 3.759).
    out, results = ranks
    for stage in STAGES:
        for rank in range(WORLD_SIZE):
            engine, unwrapped = (_spooled(out, f"{form}{stage}", rank) for form in ("engine", "unwrapped"))
            said = results[rank]["unwrapped"][f"unwrapped{stage}"]
            assert results[rank]["unwrapped"][f"engine{stage}-left"] == []  # close() removed every patch
            # Watching changes nothing in training: the same norms, losses and final weights, bit for bit.
            for form in ("engine", "unwatched"):
                twin = results[rank]["unwrapped"][f"{form}{stage}"]
                assert [(s["global_norm"], s["losses"]) for s in twin] == [
                    (s["global_norm"], s["losses"]) for s in said
                ]
                for a, b in zip(
                    results[rank]["unwrapped"][f"{form}{stage}-weights"],
                    results[rank]["unwrapped"][f"unwrapped{stage}-weights"],
                    strict=True,
                ):
                    np.testing.assert_array_equal(a, b)
            assert len(engine.steps) == len(unwrapped.steps) == 2
            for first, second, expected in zip(engine.steps, unwrapped.steps, said, strict=True):
                assert first["tensors"] == second["tensors"]
                assert first["global_grad_norm"] == second["global_grad_norm"]
                assert _float(second["global_grad_norm"]) == pytest.approx(expected["global_norm"], rel=RTOL)
                assert second["clipped"] is True


REFUSED = {
    "stage0": "no ZeRO (stage 0, AdamW)",
    "stage0-fp16": "no ZeRO (stage 0, FP16_UnfusedOptimizer)",
    "bf16-fp32-accumulation": "BF16_Optimizer",
    "offload-optimizer": "ZeRO-Offload of the optimizer to cpu",
    "offload-param": "ZeRO-Offload of the parameters to cpu",
    "hpz": "ZeRO++",
    "autocast": "torch_autocast",
    "nvme": "ZeRO-Infinity offload of the optimizer to NVMe",
    "moe": "mixture-of-experts",
    "tensor-parallel": "model or tensor parallelism",
    "zenflow": "ZenFlow",
    "deepcompile": "DeepCompile",
    "muon": "Muon",
    "smaller-group": "a data-parallel group smaller than the world",
}


def test_every_unsupported_deepspeed_setup_is_refused_by_name(ranks) -> None:
    _, results = ranks
    for rank_results in results:
        said = rank_results["refusals"]
        for name, words in REFUSED.items():
            for form in ("", "-unwrapped"):  # watch(engine), watch(engine.module, engine.optimizer)
                assert said[name + form].startswith("numwatch: DeepSpeed with "), (name + form, said[name + form])
                assert words in said[name + form], (name + form, said[name + form])
        assert "pipeline parallelism (PipelineEngine)" in said["pipeline"]
        assert "MiCS" in said["mics"] and "removed" in said["mics"]  # DeepSpeed 0.19.8 refuses it itself
