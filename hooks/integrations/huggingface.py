"""Hugging Face ``Trainer`` adapter: ``Trainer(..., callbacks=[NumwatchCallback(run="my-run")])``.

One numwatch step per optimizer step (gradient accumulation respected). The Trainer clips
right after the last micro-batch's backward, with no callback in between, so the gradients
are measured at the end of that backward (:class:`BackwardEndTrigger`): the numbers are the
pre-clipping ones, whose global norm is the ``grad_norm`` the Trainer logs. The step ends
after the optimizer update; on logging steps it carries the Trainer's logged values (loss
as ``loss``, the others as ``trainer_<name>`` scalars).

With a DeepSpeed config (``TrainingArguments(deepspeed=...)``) the engine's step reads and
ends each step (:mod:`numwatch.step.deepspeed_site`); the Trainer's logged values join it
until the next backward.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from numwatch.capture.backward_end import BackwardEndTrigger
from numwatch.watcher import Watcher, watch


class NumwatchCallback(TrainerCallback):
    """Watches the Trainer's model, optimizer and GradScaler; ``watch_options`` go to :func:`numwatch.watch`."""

    def __init__(self, run: str | None = None, **watch_options: Any) -> None:
        self.run = run
        self.watch_options = watch_options
        self.watcher: Watcher | None = None
        self._trigger: BackwardEndTrigger | None = None
        self._gradient_state: Any = None

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if self.watcher is not None:
            self._close()  # a second train() call starts a new watcher
        self.watcher = watch(
            model,
            optimizer,
            run=self.run or args.run_name,
            measure="manual",
            config={"framework": "transformers", **self._arguments(args)},
            **self.watch_options,
        )
        # Accelerate's GradientState says whether this micro-batch ends an accumulation.
        self._gradient_state = getattr(optimizer, "gradient_state", None)
        self._trigger = BackwardEndTrigger(model, self._backward_ended)

    @staticmethod
    def _arguments(args: Any) -> dict[str, Any]:
        return {
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": args.max_grad_norm,
            "fp16": args.fp16,
            "bf16": args.bf16,
        }

    def _backward_ended(self) -> None:
        if self.watcher is not None and (self._gradient_state is None or self._gradient_state.sync_gradients):
            self.watcher.gradients_ready()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # DefaultFlowCallback (first in the list) has decided by now whether this step logs.
        if self.watcher is not None and not control.should_log:
            self.watcher.finish_step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.watcher is None:
            return
        # Under DeepSpeed the step ended inside the engine's step, before the Trainer logs it.
        ended = self.watcher.takes_logs_for(state.global_step) and "loss" in (logs or {})
        if not (self.watcher.step_in_progress or ended):
            return  # evaluation and end-of-training logs belong to no optimizer step
        numbers = {
            name: float(value)
            for name, value in (logs or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        scalars = {f"trainer_{name}": value for name, value in numbers.items() if name != "loss"}
        if "loss" in numbers:
            scalars["loss"] = numbers["loss"]
        self.watcher.log(**scalars)
        self.watcher.finish_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._trigger is not None:
            self._trigger.remove()
            self._trigger = None
        if self.watcher is not None:
            self.watcher.finish_step()
            self.watcher.close()
            self.watcher = None
