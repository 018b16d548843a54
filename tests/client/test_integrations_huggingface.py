"""Hugging Face Trainer: numwatch's numbers against the Trainer's own (tiny GPT-2, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from numwatch.integrations import HuggingFaceCallback  # noqa: E402
from tests.support.watch_helpers import run_spool  # noqa: E402

MAX_STEPS = 4
ACCUMULATION = 2
RTOL = 1e-5


def _dataset(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _train(tmp_path, run: str, optim: str = "adamw_torch"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)  # random weights: nothing is downloaded
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"out-{run}"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUMULATION,
        max_grad_norm=0.05,  # small: the Trainer clips every step
        learning_rate=1e-3,
        max_steps=MAX_STEPS,
        logging_steps=1,
        optim=optim,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    callback = HuggingFaceCallback(run=run, spool_dir=tmp_path / "spool", histogram_every=2)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_dataset(), callbacks=[callback])
    trainer.train()
    return trainer, run_spool(tmp_path / "spool", run)


@pytest.fixture(scope="module")
def foreach_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("hf"), "foreach", "adamw_torch")


def test_one_step_per_optimizer_step_with_the_trainers_pre_clipping_grad_norm(foreach_run):
    trainer, spooled = foreach_run
    assert trainer.state.global_step == MAX_STEPS
    assert [s["step"] for s in spooled.steps] == list(range(1, MAX_STEPS + 1))
    logged = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, MAX_STEPS + 1))
    for step, entry in zip(spooled.steps, logged, strict=True):
        # Pre-clipping: far above max_grad_norm, and equal to what the Trainer logged.
        assert entry["grad_norm"] > 0.05
        assert step["global_grad_norm"] == pytest.approx(entry["grad_norm"], rel=RTOL)
        assert step["loss"] == pytest.approx(entry["loss"], rel=1e-12)
        assert step["lr"] == [pytest.approx(entry["learning_rate"], rel=1e-12)] * len(step["lr"])
        assert step["scalars"]["trainer_grad_norm"] == entry["grad_norm"]


def test_per_tensor_norms_cover_every_parameter(foreach_run):
    trainer, spooled = foreach_run
    names = [t["name"] for t in spooled.runs[0]["tensors"]]
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert names == trainable
    for step in spooled.steps:
        norms = spooled.stat(step, "grad_norm").astype(np.float64)
        assert np.all(norms > 0)
        assert np.sqrt(np.sum(norms**2)) == pytest.approx(step["global_grad_norm"], rel=1e-6)


def test_fused_and_foreach_adamw_give_the_same_numbers(foreach_run, tmp_path):
    _, foreach = foreach_run
    _, fused = _train(tmp_path, "fused", "adamw_torch_fused")
    assert [s["step"] for s in fused.steps] == [s["step"] for s in foreach.steps]
    for a, b in zip(foreach.steps, fused.steps, strict=True):
        assert b["global_grad_norm"] == pytest.approx(a["global_grad_norm"], rel=RTOL)
        np.testing.assert_allclose(fused.stat(b, "grad_norm"), foreach.stat(a, "grad_norm"), rtol=1e-4, atol=1e-9)
    assert fused.runs[0]["config"]["optimizer"] == "AdamW"
