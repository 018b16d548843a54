"""Lightning: numwatch's numbers against Lightning's own (CPU, bf16-mixed and a CPU GradScaler)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402
from pytorch_lightning.utilities import grad_norm  # noqa: E402

from numwatch.integrations import LightningCallback  # noqa: E402
from tests.support.watch_helpers import run_spool  # noqa: E402

MAX_STEPS = 4
ACCUMULATION = 2


def _loader(batches: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(batches * 4, 6, generator=generator), torch.randn(batches * 4, 3, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=4)


class Regression(pl.LightningModule):
    """A small MLP that records Lightning's grad_norm at every on_before_optimizer_step."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.fused = fused
        self.lightning_norms: list[dict[str, float]] = []
        self.batch_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs).float(), targets)
        self.batch_losses.append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.lightning_norms.append({name: float(value) for name, value in grad_norm(self, norm_type=2).items()})

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused, foreach=None if self.fused else True)


def _trainer(callback, max_steps: int = MAX_STEPS, **options) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **options,
    )


def _fit_bf16(tmp_path, run: str, fused: bool, clip: float | None = None):
    module = Regression(fused=fused)
    trainer = _trainer(
        LightningCallback(run=run, spool_dir=tmp_path),
        precision="bf16-mixed",
        accumulate_grad_batches=ACCUMULATION,
        gradient_clip_val=clip,
    )
    trainer.fit(module, _loader(MAX_STEPS * ACCUMULATION))
    return trainer, module, run_spool(tmp_path, run)


def test_bf16_mixed_norms_equal_lightnings_grad_norm(tmp_path):
    trainer, module, spooled = _fit_bf16(tmp_path, "bf16", fused=False, clip=0.01)
    assert trainer.global_step == MAX_STEPS == len(spooled.steps) == len(module.lightning_norms)
    names = [t["name"] for t in spooled.runs[0]["tensors"]]
    for number, (step, lightning) in enumerate(zip(spooled.steps, module.lightning_norms, strict=True), start=1):
        assert step["step"] == number
        expected = [lightning[f"grad_2.0_norm/{name}"] for name in names]
        np.testing.assert_allclose(spooled.stat(step, "grad_norm"), expected, rtol=1e-6)
        # Measured before Lightning clipped to 0.01.
        assert step["global_grad_norm"] == pytest.approx(lightning["grad_2.0_norm_total"], rel=1e-5)
        assert step["global_grad_norm"] > 0.01
        # Lightning divides each micro-batch loss by accumulate_grad_batches: the step's mean.
        micro = module.batch_losses[(number - 1) * ACCUMULATION : number * ACCUMULATION]
        assert step["loss"] == pytest.approx(sum(micro) / ACCUMULATION, rel=1e-6)


def test_fused_and_foreach_adamw_give_the_same_numbers(tmp_path):
    # Lightning refuses clipping with fused optimizers under mixed precision: neither run clips.
    _, _, foreach = _fit_bf16(tmp_path, "foreach", fused=False)
    _, _, fused = _fit_bf16(tmp_path, "fused", fused=True)
    for a, b in zip(foreach.steps, fused.steps, strict=True):
        assert b["global_grad_norm"] == pytest.approx(a["global_grad_norm"], rel=1e-5)
        np.testing.assert_allclose(fused.stat(b, "grad_absmax"), foreach.stat(a, "grad_absmax"), rtol=1e-5)


class ManualOptimisation(Regression):
    """Manual optimisation under a CPU GradScaler whose first scales overflow fp16 activations."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.scales: list[float] = []

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs).float(), targets)
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        self.scales.append(self.trainer.precision_plugin.scaler.get_scale())


def test_manual_optimisation_with_a_grad_scaler_counts_the_scalers_skips(tmp_path):
    init_scale = 2.0**24  # fp16 activation gradients overflow until the scale has backed off
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    module = ManualOptimisation()
    trainer = _trainer(
        LightningCallback(run="manual", spool_dir=tmp_path),
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        max_steps=12,
    )
    trainer.fit(module, _loader(12))
    spooled = run_spool(tmp_path, "manual")
    assert len(spooled.steps) == 12 == len(module.scales)
    backoffs = round(math.log2(init_scale / scaler.get_scale()))
    assert backoffs > 0
    assert sum(step["skipped"] for step in spooled.steps) == backoffs
    assert [step["new_loss_scale"] for step in spooled.steps] == module.scales
    assert all(step["scale_decision"] == ("backoff" if step["skipped"] else "none") for step in spooled.steps)


def test_two_optimizers_are_refused(tmp_path):
    class TwoOptimizers(ManualOptimisation):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    from numwatch import UnsupportedConfiguration

    with pytest.raises(UnsupportedConfiguration, match="one optimizer"):
        _trainer(LightningCallback(run="two", spool_dir=tmp_path)).fit(TwoOptimizers(), _loader(2))
