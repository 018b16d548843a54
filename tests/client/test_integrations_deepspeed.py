"""The framework adapters under DeepSpeed ZeRO: the Hugging Face Trainer with a DeepSpeed
config, Accelerate's DeepSpeed plugin, Lightning's DeepSpeed strategy (refused).

Two spawned gloo ranks on the CPU run every scenario in one process group (DeepSpeed's
start-up costs seconds per process) and save what each rank saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.support.deepspeed_ranks import WORLD_SIZE, init_deepspeed, run_rank, spawn, zero_config
from tests.support.watch_helpers import Spooled, read_spool

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HF_STEPS = 3
ACCELERATE_STEPS = 3
RTOL = 1e-5


def _hugging_face(rank: int, spool: str) -> list[dict[str, Any]]:
    """A tiny GPT-2 (built from a config: nothing is downloaded) under ZeRO-2 with accumulation 2."""
    import transformers

    from numwatch.integrations import HuggingFaceCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row.clone()} for row in ids]
    deepspeed = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "steps_per_print": 1 << 30,
    }
    arguments = transformers.TrainingArguments(
        output_dir=str(Path(spool) / f"out{rank}"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.05,  # small: every step is clipped
        learning_rate=1e-3,
        max_steps=HF_STEPS,
        logging_steps=1,
        optim="adamw_torch",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        deepspeed=deepspeed,
    )
    callback = HuggingFaceCallback(run="hf-zero2", spool_dir=spool, histogram_every=2)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    return trainer.state.log_history


def _accelerate(rank: int, spool: str) -> list[dict[str, Any]]:
    """Accelerate's DeepSpeed plugin, ZeRO-3: watch() on the objects prepare() returned."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, GradientState
    from deepspeed.utils import safe_get_full_grad

    import numwatch

    AcceleratorState._reset_state(reset_partial_state=True)  # the Trainer's Accelerator came first
    GradientState._reset_state()
    config = zero_config(3, "fp32", micro_batch=4, gradient_clipping=1.0)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 4))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    grads: list[list[np.ndarray]] = []
    engine_step = model.step

    def step(*args: Any, **kwargs: Any) -> Any:
        # Accelerate's DeepSpeed backward runs engine.backward, then this (optimizer.step() is a no-op).
        grads.append([safe_get_full_grad(p).double().numpy().ravel() for p in model.module.parameters()])
        return engine_step(*args, **kwargs)

    model.step = step
    seen = []
    with numwatch.watch(model, optimizer, run="accelerate-zero3", spool_dir=spool):
        for index in range(ACCELERATE_STEPS):
            generator = torch.Generator().manual_seed(10 * index + rank)  # each rank its own batch
            inputs, targets = torch.randn(4, 6, generator=generator), 20 * torch.randn(4, 4, generator=generator)
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            seen.append({"loss": float(loss), "norm": float(model.get_global_grad_norm()), "grads": grads[-1]})
    return seen


def _lightning(spool: str) -> str:
    """The Lightning callback meets Lightning's DeepSpeed strategy (which runs on CUDA only)."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DeepSpeedStrategy

    import numwatch
    from numwatch.integrations import LightningCallback

    trainer = pl.Trainer(accelerator="cpu", strategy=DeepSpeedStrategy(stage=2), logger=False)
    try:
        LightningCallback(run="lightning-zero2", spool_dir=spool).on_train_start(trainer, pl.LightningModule())
        return "accepted"
    except numwatch.UnsupportedConfiguration as refusal:
        return str(refusal)


def _ranks(rank: int, port: int, out: str) -> None:
    def body() -> None:
        init_deepspeed(rank, port)
        results = {
            "hugging_face": _hugging_face(rank, out),
            "accelerate": _accelerate(rank, out),
            "lightning": _lightning(out),
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")

    run_rank(body)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("deepspeed-integrations")
    spawn(_ranks, str(out))
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _spooled(out: Path, run: str, rank: int) -> Spooled:
    (directory,) = out.glob(f"{run}.*")
    return read_spool(directory / f"rank{rank}")


def test_hugging_face_trainer_logs_numwatchs_global_grad_norm(ranks) -> None:
    out, results = ranks
    for rank in range(WORLD_SIZE):
        spooled = _spooled(out, "hf-zero2", rank)
        assert spooled.runs[0]["config"]["optimizer"] == "DeepSpeedZeroOptimizer"
        logged = [entry for entry in results[rank]["hugging_face"] if "grad_norm" in entry]
        assert [entry["step"] for entry in logged] == list(range(1, HF_STEPS + 1))
        # One numwatch step per optimizer step (two micro-batches each).
        assert [s["step"] for s in spooled.steps] == list(range(1, HF_STEPS + 1))
        for step, entry in zip(spooled.steps, logged, strict=True):
            assert entry["grad_norm"] > 0.05
            assert step["global_grad_norm"] == pytest.approx(entry["grad_norm"], rel=RTOL)
            assert step["clipped"] is True
            assert step["clip_coef"] == pytest.approx(0.05 / (entry["grad_norm"] + 1e-6), rel=RTOL)
            # The Trainer's logged values join the step DeepSpeed's engine ended.
            assert step["loss"] == pytest.approx(entry["loss"], rel=1e-12)
            assert step["scalars"]["trainer_grad_norm"] == entry["grad_norm"]


def test_accelerate_deepspeed_plugin_through_watch_on_the_prepared_objects(ranks) -> None:
    out, results = ranks
    for rank in range(WORLD_SIZE):
        spooled = _spooled(out, "accelerate-zero3", rank)
        said = results[rank]["accelerate"]
        assert [s["step"] for s in spooled.steps] == list(range(1, ACCELERATE_STEPS + 1))
        for step, expected in zip(spooled.steps, said, strict=True):
            assert step["global_grad_norm"] == pytest.approx(expected["norm"], rel=RTOL)
            assert step["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # this rank's own
            np.testing.assert_allclose(
                spooled.stat(step, "grad_norm"), [np.linalg.norm(g) for g in expected["grads"]], rtol=RTOL
            )
    # The ranks trained on different batches: their losses differ, the reduced numbers do not.
    assert results[0]["accelerate"][0]["loss"] != results[1]["accelerate"][0]["loss"]


def test_lightnings_deepspeed_strategy_is_refused_by_the_callback(ranks) -> None:
    _, results = ranks
    for rank_results in results:
        assert "Lightning's DeepSpeed strategy" in rank_results["lightning"]
