"""The training loops users write, each checked against the loop's own numbers at every step.

Every loop clips, so a number taken after clipping would show: the recorded pre-clip global
norm must equal what the loop's clipping function returned (or, for value clipping, a
float64 norm of the gradients the loop cloned before clipping).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import numwatch
from numwatch import protocol
from numwatch.kernels import stats
from tests.support.watch_helpers import BackwardInjection, read_spool, reference_norms

RTOL = 1e-5


class TinyGPT(nn.Module):
    """A small causal language model in the nanoGPT shape: forward(idx, targets) -> (logits, loss)."""

    def __init__(self, vocab: int = 32, width: int = 16, context: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.block = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.head = nn.Linear(width, vocab)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.embed(idx) + self.position(torch.arange(idx.shape[1]))
        x = x + self.block(x)
        logits = self.head(x)
        loss = None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


def get_batch(
    step: int, micro: int, batch: int = 4, context: int = 8, vocab: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + micro)
    data = torch.randint(vocab, (batch, context + 1), generator=generator)
    return data[:, :-1], data[:, 1:]


def get_lr(it: int, warmup: int = 3, decay: int = 12, top: float = 3e-2, bottom: float = 3e-3) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay, then the floor."""
    if it < warmup:
        return top * (it + 1) / (warmup + 1)
    if it > decay:
        return bottom
    ratio = (it - warmup) / (decay - warmup)
    return bottom + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (top - bottom)


def _global(step: dict) -> float:
    return protocol.decode_float(step["global_grad_norm"])


def _check_norm_clip(step: dict, total: float, max_norm: float) -> None:
    """clip_coef is torch's coefficient min(1, max_norm / (total + 1e-6)); the post-clip norm total x coef."""
    coefficient = min(1.0, max_norm / (total + 1e-6))
    assert protocol.decode_float(step["clip_coef"]) == pytest.approx(coefficient, rel=RTOL)
    assert protocol.decode_float(step["post_clip_grad_norm"]) == pytest.approx(total * coefficient, rel=RTOL)
    assert step["clipped"] is (coefficient < 1.0)


def test_nanogpt_style_loop_records_preclip_norms_schedule_and_accumulated_loss(tmp_path):
    """bf16 autocast, a disabled GradScaler (as when dtype is not float16), accumulation over
    4 micro-batches with loss / 4, clip_grad_norm_(0.5), torch.compile, get_lr schedule."""
    torch.manual_seed(0)
    raw = TinyGPT()
    model = torch.compile(raw, backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=get_lr(0), weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    watcher = numwatch.watch(model, optimizer, scaler=scaler, run="nanogpt", spool_dir=tmp_path, histogram_every=5)
    accumulation, iterations = 4, 14
    norms, losses, rates = [], [], []
    for it in range(iterations):
        lr = get_lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(accumulation):
            x, y = get_batch(it, micro)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, y)
                loss = loss / accumulation
            total += loss.item()
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        rates.append(lr)
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert [t["name"] for t in spooled.runs[0]["tensors"]] == [name for name, _ in raw.named_parameters()]
    assert [s["step"] for s in spooled.steps] == list(range(1, iterations + 1))
    assert max(norms) > 0.5  # the loop did clip: a post-clip number could not pass below
    assert any(s["clipped"] for s in spooled.steps) and not all(s["clipped"] for s in spooled.steps)
    for step, norm, loss, lr in zip(spooled.steps, norms, losses, rates, strict=True):
        assert _global(step) == pytest.approx(norm, rel=RTOL)
        _check_norm_clip(step, norm, 0.5)
        assert step["loss"] == pytest.approx(loss, rel=1e-6)  # sum of the micro-batch losses / 4: their mean
        assert step["lr"] == [pytest.approx(lr, rel=1e-12)]
        assert step["skipped"] is False and step["loss_scale"] is None


def _amp_loop(tmp_path, fused: bool, inf_steps: set[int], steps: int = 12):
    """The mixed-precision guide's loop: scale(loss).backward(), unscale_, clip, step, update."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3)
    watcher = numwatch.watch(model, optimizer, scaler=scaler, run="amp", spool_dir=tmp_path)
    inject = BackwardInjection(
        model[2].weight, (slice(0, 2), slice(0, 4)), [[math.inf, -math.inf, math.nan, 1.0]] * 2, inf_steps
    )
    truth = []
    for step in range(1, steps + 1):
        inject.step = step
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x).float() - y).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        unscaled = [p.grad.detach().double().clone() for p in model.parameters()]
        clip_returned = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        truth.append({"loss": loss.item(), "clip": clip_returned, "grads": unscaled})
    watcher.close()
    return read_spool(watcher.spool_dir), truth


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_amp_loop_keeps_the_truth_on_skipped_steps(tmp_path, fused):
    inf_steps = {3, 4, 9}
    spooled, truth = _amp_loop(tmp_path, fused, inf_steps)
    assert [s["step"] for s in spooled.steps] == list(range(1, 13))
    assert [s["skipped"] for s in spooled.steps] == [i in inf_steps for i in range(1, 13)]
    for step, expected in zip(spooled.steps, truth, strict=True):
        assert step["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        norm, absmax = reference_norms(expected["grads"])
        if step["skipped"]:
            # The clip multiplied the Inf gradients by 0 (NaN); the record keeps what the backward produced.
            grads = [g.numpy() for g in expected["grads"]]
            assert spooled.stat(step, "nan_count").tolist() == [int(np.isnan(g).sum()) for g in grads] == [0, 0, 2, 0]
            assert spooled.stat(step, "inf_count").tolist() == [int(np.isinf(g).sum()) for g in grads] == [0, 0, 4, 0]
            np.testing.assert_allclose(spooled.stat(step, "grad_norm")[[0, 1, 3]], norm[[0, 1, 3]], rtol=RTOL)
            assert math.isnan(spooled.stat(step, "grad_norm")[2])
            # torch's coefficient max_norm / NaN zeroed nothing and made every gradient NaN.
            assert step["clipped"] is True and math.isnan(protocol.decode_float(step["clip_coef"]))
        else:
            assert _global(step) == pytest.approx(expected["clip"], rel=RTOL)
            _check_norm_clip(step, expected["clip"], 0.5)
            np.testing.assert_allclose(spooled.stat(step, "grad_norm"), norm, rtol=RTOL)
            np.testing.assert_allclose(spooled.stat(step, "grad_absmax"), absmax, rtol=RTOL)
    assert max(t["clip"] for t in truth if math.isfinite(t["clip"])) > 0.5


def test_clip_grad_value_leaves_the_recorded_absmax_alone(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = numwatch.watch(model, optimizer, run="value", spool_dir=tmp_path)
    before, after = [], []
    for step in range(1, 6):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
        nn.functional.mse_loss(model(x), y).backward()
        before.append([p.grad.detach().double().clone() for p in model.parameters()])
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
        after.append([p.grad.detach().double().clone() for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    for step, grads, clipped in zip(spooled.steps, before, after, strict=True):
        norm, absmax = reference_norms(grads)
        assert absmax.max() > 0.01
        np.testing.assert_allclose(spooled.stat(step, "grad_absmax"), absmax, rtol=RTOL)
        total = math.sqrt(np.sum(norm**2))
        assert _global(step) == pytest.approx(total, rel=RTOL)
        post = math.sqrt(np.sum(reference_norms(clipped)[0] ** 2))
        assert protocol.decode_float(step["post_clip_grad_norm"]) == pytest.approx(post, rel=RTOL)
        assert protocol.decode_float(step["clip_coef"]) == pytest.approx(post / total, rel=RTOL)
        assert step["clipped"] is True


def test_get_total_norm_and_clip_grads_with_norm(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    watcher = numwatch.watch(model, optimizer, run="total", spool_dir=tmp_path)
    totals = []
    for step in range(1, 6):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=generator), 10 * torch.randn(8, 3, generator=generator)
        nn.functional.mse_loss(model(x), y).backward()
        parameters = list(model.parameters())
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        torch.nn.utils.clip_grads_with_norm_(parameters, 0.25, total)
        totals.append(float(total))
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert min(totals) > 0.25
    assert [_global(s) for s in spooled.steps] == pytest.approx(totals, rel=RTOL)
    for step, total in zip(spooled.steps, totals, strict=True):
        _check_norm_clip(step, total, 0.25)


def _plain_step(model: nn.Module, step: int, micro_batches: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    loss = nn.functional.mse_loss(model(x), y) / micro_batches
    loss.backward()
    return loss


def test_log_before_and_after_the_optimizer_step_belongs_to_that_step(tmp_path):
    """The rule: a value logged after a step ended and before the model's next forward
    belongs to the step that ended; from that forward on, to the next step."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="log", spool_dir=tmp_path, histogram_every=2)
    losses = []
    for step in range(1, 6):
        loss = _plain_step(model, step)
        watcher.log(before_step=float(step))  # after the backward, before the step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad()
        watcher.log(after_step=torch.tensor(10.0 * step), loss=loss.item())  # after the step: the loop's logging line
        losses.append(loss.item())
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert [s["step"] for s in spooled.steps] == [1, 2, 3, 4, 5]
    for step, loss in zip(spooled.steps, losses, strict=True):
        assert step["scalars"] == {"before_step": step["step"], "after_step": 10 * step["step"]}
        assert step["loss"] == loss


def test_loss_is_recorded_without_user_code_in_an_fp32_loop(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="fp32", spool_dir=tmp_path)
    losses = []
    for step in range(1, 5):
        losses.append(_plain_step(model, step).item())
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert [s["loss"] for s in spooled.steps] == losses
    assert all(
        s["clip_coef"] is None and s["post_clip_grad_norm"] is None and s["clipped"] is False for s in spooled.steps
    )


def test_a_failure_inside_the_measurement_leaves_the_next_step_exact(tmp_path, monkeypatch):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="fail", spool_dir=tmp_path)
    original = stats.grad_norms
    calls = {"n": 0}

    def fails_on_the_fifth_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # step 3's first micro-batch
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(stats, "grad_norms", fails_on_the_fifth_call)
    norms, losses = [], []
    for step in range(1, 6):
        total = 0.0
        for micro in range(2):
            total += _plain_step(model, 10 * step + micro, micro_batches=2).item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)))
        losses.append(total)
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert watcher.monitoring_errors == 1 and watcher.steps == 5
    assert [s["step"] for s in spooled.steps] == [1, 2, 4, 5]
    for step in spooled.steps:
        assert _global(step) == pytest.approx(norms[step["step"] - 1], rel=RTOL)
        assert step["loss"] == pytest.approx(losses[step["step"] - 1], rel=1e-6)


def test_names_do_not_depend_on_torch_compile(tmp_path):
    torch.manual_seed(7)
    model = TinyGPT()
    plain = numwatch.watch(model, run="plain", spool_dir=tmp_path)
    names = plain.tensor_names
    plain.close()
    compiled = numwatch.watch(
        torch.compile(model, backend="aot_eager"), run="compiled", spool_dir=tmp_path, include=["block.*"]
    )
    assert names == [name for name, _ in model.named_parameters()]
    assert compiled.tensor_names == [name for name in names if name.startswith("block.")]
    compiled.close()


class Trainer:
    """A minGPT-style trainer: the optimizer is made inside run(), callbacks fire per batch."""

    def __init__(
        self, model: TinyGPT, max_iters: int, learning_rate: float = 5e-3, grad_norm_clip: float = 0.5
    ) -> None:
        self.model, self.max_iters = model, max_iters
        self.learning_rate, self.grad_norm_clip = learning_rate, grad_norm_clip
        self.callbacks: dict[str, list] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.iter_num = 0

    def add_callback(self, event: str, callback) -> None:
        self.callbacks.setdefault(event, []).append(callback)

    def trigger_callbacks(self, event: str) -> None:
        for callback in self.callbacks.get(event, []):
            callback(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for name, p in self.model.named_parameters() if name.endswith("weight") and p.dim() >= 2]
        no_decay = [p for name, p in self.model.named_parameters() if not (name.endswith("weight") and p.dim() >= 2)]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.learning_rate, betas=(0.9, 0.95))

    def run(self) -> None:
        self.optimizer = self.configure_optimizers()
        self.model.train()
        while self.iter_num < self.max_iters:
            x, y = get_batch(self.iter_num, 0)
            _, self.loss = self.model(x, y)
            self.model.zero_grad(set_to_none=True)
            self.loss.backward()
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_norm_clip)
            self.optimizer.step()
            self.trigger_callbacks("on_batch_end")
            self.iter_num += 1


def test_a_trainer_that_builds_its_optimizer_late_is_watched_from_its_first_step(tmp_path):
    torch.manual_seed(8)
    model = TinyGPT()
    trainer = Trainer(model, max_iters=6)
    watcher = numwatch.watch(model, run="mingpt", spool_dir=tmp_path)  # the one line, before the optimizer exists
    seen = []
    trainer.add_callback("on_batch_end", lambda t: seen.append((t.loss.item(), float(t.grad_norm))))
    trainer.run()
    with pytest.raises(RuntimeError, match="counts the steps of its optimizer"):
        watcher.step()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert watcher.optimizer is trainer.optimizer and watcher.steps == 6
    (run,) = spooled.runs
    assert run["config"]["optimizer"] == "AdamW"
    assert [t["group"] for t in run["tensors"]] == [
        0 if name.endswith("weight") and p.dim() >= 2 else 1 for name, p in model.named_parameters()
    ]
    assert [s["step"] for s in spooled.steps] == [1, 2, 3, 4, 5, 6]
    for step, (loss, norm) in zip(spooled.steps, seen, strict=True):
        assert step["loss"] == pytest.approx(loss, rel=1e-6)
        assert _global(step) == pytest.approx(norm, rel=RTOL)
        _check_norm_clip(step, norm, 0.5)
        assert step["lr"] == [5e-3, 5e-3]
