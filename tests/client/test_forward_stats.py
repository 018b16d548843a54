"""Forward-pass statistics recorded by the watcher: a nanoGPT-style loop (lr schedule, gradient
accumulation, clip_grad_norm_, dropout) checked against the loop's own tensors, step by step."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import numwatch
from tests.client.test_attention import reference_max
from tests.client.test_output_logits import reference
from tests.support.nanogpt import NanoGPT
from tests.support.watch_helpers import read_spool

# Every statistic here holds on the CPU path and on the accelerator path (tests/client/conftest.py).
pytestmark = pytest.mark.usefixtures("device_path")

LAYERS = [f"transformer.h.{i}.attn" for i in range(4)]
ACCUMULATION = 2


def learning_rate(it: int, warmup: int = 2, total: int = 8, top: float = 1e-3) -> float:
    if it < warmup:
        return top * (it + 1) / warmup
    return 0.1 * top + 0.45 * top * (1 + math.cos(math.pi * (it - warmup) / (total - warmup)))


def train(model: NanoGPT, steps: int, watcher=None, seen=None) -> None:
    """nanoGPT's loop; ``seen[step]`` collects each micro-batch's attention inputs and logits."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    if watcher is not None:
        watcher = numwatch.watch(model, optimizer, **watcher)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
        for n in LAYERS
    ]
    data = torch.Generator().manual_seed(7)
    torch.manual_seed(3)  # dropout
    for it in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it)
        for _ in range(ACCUMULATION):
            idx = torch.randint(0, 64, (4, 16), generator=data)
            logits, loss = model(idx, idx.roll(-1, 1))
            if seen is not None:
                qk = {n: model.get_submodule(n).qk(inputs[n])[:2] for n in LAYERS}
                seen.setdefault(it + 1, []).append((qk, logits.detach().clone()))
            (loss / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for handle in handles:
        handle.remove()
    if watcher is not None:
        watcher.close()


def test_every_layer_on_sampled_steps_and_none_on_others(tmp_path):
    torch.manual_seed(0)
    model = NanoGPT()
    seen: dict[int, list] = {}
    train(model, 8, watcher=dict(run="fwd", spool_dir=tmp_path, histogram_every=3), seen=seen)
    steps = read_spool(next(tmp_path.glob("*/*"))).steps
    assert [s["step"] for s in steps] == list(range(1, 9))
    for step in steps:
        if (step["step"] - 1) % 3:
            assert step["attention_logit_max"] is None and step["output_logits"] is None
            continue
        recorded = step["attention_logit_max"]
        assert list(recorded) == LAYERS  # forward order, named by the calling module
        for name in LAYERS:  # the largest over the step's micro-batches
            expected = max(reference_max(*qk[name], is_causal=True) for qk, _ in seen[step["step"]])
            assert recorded[name] == pytest.approx(expected, rel=1e-5)
        mean, largest, absmax = reference(*(logits for _, logits in seen[step["step"]]))
        logits = step["output_logits"]
        np.testing.assert_allclose(
            [logits["log_z_mean"], logits["log_z_max"], logits["absmax"]], [mean, largest, absmax], rtol=1e-5
        )


def test_attention_every_sets_its_own_cadence_and_zero_turns_it_off(tmp_path):
    torch.manual_seed(0)
    train(NanoGPT(), 4, watcher=dict(run="every2", spool_dir=tmp_path / "a", histogram_every=100, attention_every=2))
    steps = read_spool(next((tmp_path / "a").glob("*/*"))).steps
    assert [s["attention_logit_max"] is not None for s in steps] == [True, False, True, False]
    train(NanoGPT(), 2, watcher=dict(run="off", spool_dir=tmp_path / "b", histogram_every=1, attention_every=0))
    steps = read_spool(next((tmp_path / "b").glob("*/*"))).steps
    assert all(s["attention_logit_max"] is None and s["output_logits"] is None for s in steps)
    with pytest.raises(ValueError, match="attention_every"):
        numwatch.watch(NanoGPT(), attention_every=-1, spool_dir=tmp_path / "c")


def test_watched_training_is_bit_identical_to_unwatched(tmp_path):
    torch.manual_seed(0)
    plain = NanoGPT()
    watched = copy.deepcopy(plain)
    train(plain, 6)
    train(watched, 6, watcher=dict(run="same", spool_dir=tmp_path, histogram_every=1))
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_huggingface_gpt2_logits_from_the_model_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watcher = numwatch.watch(model, optimizer, run="hf", spool_dir=tmp_path, histogram_every=1)
    ids = torch.randint(0, 50, (2, 12))
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    optimizer.step()
    watcher.close()
    step = read_spool(watcher.spool_dir).steps[0]
    assert list(step["attention_logit_max"]) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    mean, largest, absmax = reference(output.logits)
    assert step["output_logits"]["log_z_mean"] == pytest.approx(mean, rel=1e-5)
    assert step["output_logits"]["absmax"] == pytest.approx(absmax, rel=1e-6)


def test_multihead_attention_model_and_logits_module(tmp_path):
    from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches

    cfg = GPTConfig(vocab_size=64, context=8, d_model=32, n_heads=4, n_layers=2)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="mha", spool_dir=tmp_path, histogram_every=1, logits_module="head")
    inputs, targets = next(synthetic_batches(cfg, 2))
    logits = model(inputs)
    lm_loss(logits, targets).backward()
    optimizer.step()
    watcher.close()
    step = read_spool(watcher.spool_dir).steps[0]
    assert list(step["attention_logit_max"]) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(math.isfinite(v) for v in step["attention_logit_max"].values())
    assert step["output_logits"]["absmax"] == pytest.approx(float(logits.detach().abs().max()), rel=1e-6)


def test_a_compiled_model_is_measured_under_its_own_names(tmp_path):
    torch.manual_seed(0)
    model = NanoGPT()
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = numwatch.watch(compiled, optimizer, run="compiled", spool_dir=tmp_path, histogram_every=2)
    inputs: dict[str, torch.Tensor] = {}
    for name in LAYERS:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].detach()))
    idx = torch.randint(0, 64, (2, 16))
    expected = []
    for _ in range(3):
        compiled(idx, idx)[1].backward()
        expected.append({n: reference_max(*model.get_submodule(n).qk(inputs[n])[:2], is_causal=True) for n in LAYERS})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    watcher.close()
    steps = read_spool(watcher.spool_dir).steps
    assert [s["attention_logit_max"] is not None for s in steps] == [
        True,
        False,
        True,
    ] and watcher.monitoring_errors == 0
    for step in (steps[0], steps[2]):
        assert list(step["attention_logit_max"]) == LAYERS  # no _orig_mod in the names
        assert list(step["attention_logit_max"].values()) == pytest.approx(
            list(expected[step["step"] - 1].values()), rel=1e-5
        )
