"""Lightning adapter: ``Trainer(callbacks=[NumwatchCallback(run="my-run")])``.

One numwatch step per optimizer step, automatic or manual optimisation alike: Lightning
calls ``on_before_optimizer_step`` after the backward (and the precision plugin's
unscaling) and before it clips, inside ``optimizer.step(closure)``; the gradients are
measured there and the step ends with the training batch (or at the next optimizer step
of the same batch). The precision plugin's GradScaler is watched, so loss scale and
skipped steps are the scaler's. The loss is the sum of what went into the step's
backwards (Lightning divides it by ``accumulate_grad_batches``), so the batch mean.

Works with ``import lightning`` and with ``import pytorch_lightning``, whichever is installed.
Lightning's DeepSpeed strategy is refused (:class:`UnsupportedConfiguration`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from numwatch.kernels.sharded import UnsupportedConfiguration
from numwatch.protocol import RunStatus
from numwatch.watcher import Watcher, watch

if TYPE_CHECKING:  # the same class under either name; checked against pytorch_lightning
    from pytorch_lightning import Callback
else:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback


class NumwatchCallback(Callback):
    """Watches the LightningModule, its optimizer and the precision plugin's GradScaler;
    ``watch_options`` go to :func:`numwatch.watch`. One optimizer only."""

    def __init__(self, run: str | None = None, **watch_options: Any) -> None:
        super().__init__()
        self.run = run
        self.watch_options = watch_options
        self.watcher: Watcher | None = None
        self._loss: torch.Tensor | None = None  # sum of the losses backpropagated into this step

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            raise UnsupportedConfiguration(
                "numwatch: the Lightning callback does not support Lightning's DeepSpeed strategy (Lightning runs it "
                "on CUDA only, where this adapter is untested). numwatch supports DeepSpeed ZeRO through the engine: "
                "numwatch.watch(engine) with DeepSpeed, the Hugging Face Trainer or Accelerate."
            )
        if len(trainer.optimizers) != 1:
            raise UnsupportedConfiguration(
                "numwatch: the Lightning callback watches one optimizer; "
                f"this module configures {len(trainer.optimizers)}. "
                "Call numwatch.watch(module, optimizer, include=[...]) per optimizer instead."
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        config = {
            "framework": "lightning",
            "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "automatic_optimization": pl_module.automatic_optimization,
        }
        self.watcher = watch(
            pl_module,
            trainer.optimizers[0],
            scaler=scaler,
            run=self.run,
            measure="manual",
            config=config,
            **self.watch_options,
        )

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self.watcher is None or self.watcher.scaler is not None:
            return  # the watcher takes the loss from scaler.scale() itself
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.watcher is None:
            return
        if self.watcher.step_in_progress:
            self.watcher.finish_step()  # manual optimisation: several optimizer steps in one batch
        self.watcher.gradients_ready()
        if self._loss is not None:
            self.watcher.log(
                loss=self._loss
            )  # after gradients_ready(): a value logged before it belongs to the step that ended
            self._loss = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.watcher is not None:
            self.watcher.finish_step()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close("crashed")

    def _close(self, status: RunStatus) -> None:
        if self.watcher is not None:
            self.watcher.finish_step()
            self.watcher.close(status)
            self.watcher = None
