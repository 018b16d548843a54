"""Max attention logit: against a float64 reference that materialises the whole logit matrix,
and captured from SDPA however a model calls it (nanoGPT-style imports, Hugging Face GPT-2,
nn.MultiheadAttention, hand-written attention that reports itself)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numwatch import observe_attention
from numwatch.capture.attention import AttentionCapture, max_attention_logit
from tests.support.nanogpt import NanoGPT

# Every statistic here holds on the CPU path and on the accelerator path (tests/client/conftest.py).
pytestmark = pytest.mark.usefixtures("device_path")


def reference_max(q, k, *, scale=None, mask=None, is_causal=False, enable_gqa=False) -> float:
    """Materialise scale * q @ k^T in float64, mask it, take the max (NaN if an unmasked logit is NaN)."""
    q64, k64 = q.detach().double(), k.detach().double()
    if enable_gqa and q64.size(-3) != k64.size(-3):
        k64 = k64.repeat_interleave(q64.size(-3) // k64.size(-3), dim=-3)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    logits = q64 @ k64.transpose(-2, -1) * scale
    allowed = torch.ones(logits.shape, dtype=torch.bool)
    if is_causal:
        allowed &= torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    if mask is not None:
        allowed &= mask if mask.dtype == torch.bool else mask != -math.inf
    kept = logits[allowed]
    if kept.numel() == 0:
        return -math.inf
    return math.nan if torch.isnan(kept).any() else float(kept.max())


def tensors(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_matches(value: torch.Tensor, expected: float) -> None:
    assert value.dim() == 0
    got = float(value)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


CHUNKS = [16, 1 << 22]  # many chunks (one query row or less each) and one


@pytest.mark.parametrize("chunk", CHUNKS)
def test_causal_batch_and_heads(chunk):
    q, k = tensors(3, 4, 37, 16, seed=1), tensors(3, 4, 37, 16, seed=2)
    assert_matches(max_attention_logit(q, k, is_causal=True, chunk_elements=chunk), reference_max(q, k, is_causal=True))
    assert_matches(max_attention_logit(q, k, chunk_elements=chunk), reference_max(q, k))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_causal_with_more_keys_than_queries_is_top_left(chunk):
    q, k = tensors(2, 2, 5, 8, seed=3), tensors(2, 2, 11, 8, seed=4)
    assert_matches(max_attention_logit(q, k, is_causal=True, chunk_elements=chunk), reference_max(q, k, is_causal=True))


def test_causal_excludes_a_huge_future_logit():
    q, k = torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4)
    q[0, 0, 1] = 10.0  # q_1 . k_4 = 400: a future position for row 1
    k[0, 0, 4] = 10.0
    q[0, 0, 5] = 1.0  # q_5 . k_4 = 40, seen by row 5
    assert float(max_attention_logit(q, k, scale=1.0)) == 400.0
    assert float(max_attention_logit(q, k, scale=1.0, is_causal=True)) == 40.0


@pytest.mark.parametrize("chunk", CHUNKS)
def test_boolean_mask(chunk):
    q, k = tensors(2, 3, 9, 8, seed=5), tensors(2, 3, 13, 8, seed=6)
    mask = tensors(2, 1, 9, 13, seed=7) > 0.3  # broadcast over heads; some rows fully masked
    mask[0, 0, 2] = False
    assert_matches(max_attention_logit(q, k, attn_mask=mask, chunk_elements=chunk), reference_max(q, k, mask=mask))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_additive_mask_with_minus_infinity(chunk):
    q, k = tensors(2, 3, 9, 8, seed=8), tensors(2, 3, 9, 8, seed=9)
    keep = tensors(9, 9, seed=10) > 0
    bias = tensors(9, 9, seed=11)  # a finite additive bias is not part of the measured logit
    mask = torch.where(keep, bias, torch.tensor(-math.inf))
    assert_matches(max_attention_logit(q, k, attn_mask=mask, chunk_elements=chunk), reference_max(q, k, mask=mask))


def test_additive_mask_of_the_dtype_minimum_masks():
    q, k = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    q[0, 0, 0, 0] = k[0, 0, 1, 0] = 8.0  # logit 64 at (0, 1)
    mask = torch.zeros(2, 2)
    mask[0, 1] = torch.finfo(torch.float32).min  # how Hugging Face writes a masked position
    assert float(max_attention_logit(q, k, scale=1.0)) == 64.0
    assert float(max_attention_logit(q, k, scale=1.0, attn_mask=mask)) == 0.0


@pytest.mark.parametrize("chunk", CHUNKS)
def test_grouped_query_attention(chunk):
    q, k = tensors(2, 6, 11, 8, seed=12), tensors(2, 2, 11, 8, seed=13)
    mask = tensors(2, 6, 11, 11, seed=14) > -0.5
    expected = reference_max(q, k, mask=mask, is_causal=True, enable_gqa=True)
    assert_matches(
        max_attention_logit(q, k, attn_mask=mask, is_causal=True, enable_gqa=True, chunk_elements=chunk), expected
    )
    # each query head reads its own group's key head, not any other
    k_other = k.flip(-3)
    assert expected != reference_max(q, k_other, mask=mask, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_custom_scale(chunk):
    q, k = tensors(1, 2, 7, 5, seed=15), tensors(1, 2, 7, 5, seed=16)
    assert_matches(max_attention_logit(q, k, scale=0.37, chunk_elements=chunk), reference_max(q, k, scale=0.37))
    assert_matches(
        max_attention_logit(q, k, scale=3.0, is_causal=True, chunk_elements=chunk),
        reference_max(q, k, scale=3.0, is_causal=True),
    )


def test_nan_in_an_unmasked_query_is_nan_and_in_a_masked_one_is_not():
    q, k = tensors(2, 2, 6, 4, seed=17), tensors(2, 2, 6, 4, seed=18)
    q_nan = q.clone()
    q_nan[1, 0, 3, 2] = math.nan
    assert math.isnan(float(max_attention_logit(q_nan, k, is_causal=True, chunk_elements=8)))
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[3] = False  # the NaN row takes no part
    assert_matches(max_attention_logit(q_nan, k, attn_mask=mask), reference_max(q, k, mask=mask))


def test_low_precision_inputs_are_measured_in_float32():
    q, k = tensors(1, 2, 8, 16, seed=19).bfloat16() * 30, tensors(1, 2, 8, 16, seed=20).bfloat16() * 30
    value = max_attention_logit(q, k)
    assert value.dtype == torch.float32
    assert_matches(value, reference_max(q, k))


def test_everything_masked_is_minus_infinity():
    q, k = tensors(1, 1, 3, 4), tensors(1, 1, 3, 4)
    assert float(max_attention_logit(q, k, attn_mask=torch.zeros(3, 3, dtype=torch.bool))) == -math.inf


def test_chunks_bound_the_logits_held_at_once(monkeypatch):
    """No intermediate larger than the chunk: every matmul result has at most chunk_elements values."""
    q, k = tensors(2, 4, 256, 8, seed=21), tensors(2, 4, 256, 8, seed=22)
    sizes = []
    original = torch.Tensor.__matmul__

    def recording(a, b):
        result = original(a, b)
        sizes.append(result.numel())
        return result

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording)
    value = max_attention_logit(q, k, is_causal=True, chunk_elements=4096)
    monkeypatch.undo()
    assert max(sizes) <= 4096 and len(sizes) == 256 // (4096 // (2 * 4 * 256))
    assert sum(sizes) < 2 * 4 * 256 * 256 * 0.6  # causal chunks skip keys no row of theirs sees
    assert_matches(value, reference_max(q, k, is_causal=True))


# -- capture from models -----------------------------------------------------------------


def attention_inputs(
    modules: dict[str, nn.Module],
) -> tuple[dict[str, torch.Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """The hidden states each named module receives (to recompute its q and k by hand)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda m, args, kwargs, n=n: seen.__setitem__(n, (args[0] if args else kwargs["hidden_states"]).detach()),
            with_kwargs=True,
        )
        for n, m in modules.items()
    ]
    return seen, handles


def test_nanogpt_both_imports_every_layer_in_forward_order():
    torch.manual_seed(0)
    model = NanoGPT()
    names = [f"transformer.h.{i}.attn" for i in range(4)]
    seen, handles = attention_inputs({n: model.get_submodule(n) for n in names})
    idx = torch.randint(0, 64, (3, 16))
    capture = AttentionCapture(model)
    with capture.measuring():
        logits, loss = model(idx, idx)
    loss.backward()  # the captured forward still trains
    maxima = capture.take_step()
    assert list(maxima) == names
    for name in names:
        q, k, _ = model.get_submodule(name).qk(seen[name])
        assert_matches(maxima[name], reference_max(q, k, is_causal=True))
    assert capture.take_step() == {}
    for handle in handles:
        handle.remove()


def test_nothing_is_intercepted_outside_the_capture():
    model = NanoGPT()
    capture = AttentionCapture(model)
    model(torch.randint(0, 64, (2, 16)))
    assert capture.take_step() == {}
    with capture.measuring():
        pass
    assert not torch.overrides._get_current_function_mode_stack()
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks


def test_capture_does_not_change_what_the_model_computes():
    torch.manual_seed(0)
    model = NanoGPT()
    idx = torch.randint(0, 64, (2, 16))
    torch.manual_seed(5)
    plain, _ = model(idx)  # dropout: the capture must not draw random numbers either
    torch.manual_seed(5)
    with AttentionCapture(model).measuring():
        captured, _ = model(idx)
    assert torch.equal(plain, captured)


def test_gradient_accumulation_keeps_the_largest_value_and_repeated_calls_are_numbered():
    class TwoCalls(nn.Module):
        def forward(self, q, k):
            return F.scaled_dot_product_attention(q, k, k) + F.scaled_dot_product_attention(q * 2, k, k)

    model = nn.Sequential(TwoCalls())
    capture = AttentionCapture(model)
    small, large = tensors(1, 2, 4, 8, seed=30), tensors(1, 2, 4, 8, seed=31) * 3
    with capture.measuring():
        model[0](small, small)
    with capture.measuring():
        model[0](large, large)
    maxima = capture.take_step()
    assert list(maxima) == ["0", "0#2"]
    assert_matches(maxima["0"], max(reference_max(small, small), reference_max(large, large)))
    assert_matches(maxima["0#2"], max(reference_max(small * 2, small), reference_max(large * 2, large)))


def test_multihead_attention_without_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=True))
    mha = model[0]
    x = tensors(2, 7, 16, seed=40)
    causal = torch.triu(torch.full((7, 7), -math.inf), diagonal=1)  # additive, as the benchmark model passes it
    capture = AttentionCapture(model)
    with capture.measuring():
        mha(x, x, x, attn_mask=causal, need_weights=False)
    w_q, w_k, _ = mha.in_proj_weight.split(16)
    b_q, b_k, _ = mha.in_proj_bias.split(16)
    heads = lambda z: z.view(2, 7, 4, 4).transpose(1, 2)  # noqa: E731
    q, k = heads(x @ w_q.T + b_q), heads(x @ w_k.T + b_k)
    assert list(capture.take_step()) == ["0"]
    with capture.measuring():
        mha(x, x, x, attn_mask=causal, need_weights=False)
    assert_matches(capture.take_step()["0"], reference_max(q, k, mask=causal))


def test_huggingface_gpt2_with_sdpa_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=3, n_head=2, n_embd=16, n_positions=32, vocab_size=50, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa"
    names = [f"transformer.h.{i}.attn" for i in range(3)]
    seen, handles = attention_inputs({n: model.get_submodule(n) for n in names})
    ids = torch.randint(0, 50, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding in the second sequence
    capture = AttentionCapture(model)
    with capture.measuring():
        model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.backward()
    maxima = capture.take_step()
    assert list(maxima) == names
    keep = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12) & attention_mask.bool()[:, None, None, :]
    for name in names:
        attn = model.get_submodule(name)
        q, k, _ = attn.c_attn(seen[name]).split(16, dim=2)
        q, k = (z.view(2, 12, 2, 8).transpose(1, 2) for z in (q, k))
        assert_matches(maxima[name], reference_max(q, k, mask=keep))


def test_observe_attention_for_hand_written_attention():
    class HandWritten(nn.Module):
        def forward(self, q, k, v):
            observe_attention(q, k, scale=0.5, mask=torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril())
            logits = (q @ k.transpose(-2, -1) * 0.5).masked_fill(
                torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).triu(1), -math.inf
            )
            return logits.softmax(-1) @ v

    model = nn.Sequential(nn.Identity(), HandWritten())
    q, k = tensors(2, 2, 5, 4, seed=50), tensors(2, 2, 5, 4, seed=51)
    observe_attention(q, k)  # outside a measured forward: nothing happens
    capture = AttentionCapture(model)
    with capture.measuring():
        model[1](q, k, k)
    maxima = capture.take_step()
    assert list(maxima) == ["1"]
    assert_matches(maxima["1"], reference_max(q, k, scale=0.5, is_causal=True))


# -- the forward probe: which forwards are measured ----------------------------------------


def test_probe_measures_only_due_forwards_with_gradients_enabled():
    from numwatch.capture.forward_probe import ForwardProbe

    torch.manual_seed(0)
    model = NanoGPT()
    due = [True]
    failures: list[str] = []
    probe = ForwardProbe(model, lambda: due[0], failures.append)
    idx = torch.randint(0, 64, (2, 16))
    logits, _ = model(idx)
    attention, log_z = probe.take_step()
    assert list(attention) == [f"transformer.h.{i}.attn" for i in range(4)]
    assert log_z is not None and float(log_z[2]) == float(logits.detach().abs().max())
    due[0] = False
    model(idx)
    assert probe.take_step() == ({}, None)
    due[0] = True
    with torch.no_grad():
        model(idx)  # an evaluation forward is not a training step's
    assert probe.take_step() == ({}, None)
    probe.remove()
    model(idx)
    assert probe.take_step() == ({}, None) and failures == []


def test_probe_reads_the_logits_of_a_named_module():
    from numwatch.capture.forward_probe import ForwardProbe

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            return {"scores": self.head(self.body(x))}  # logits not found in the output itself

    model = Classifier()
    with pytest.raises(ValueError, match="logits_module='nothing'"):
        ForwardProbe(model, lambda: True, print, logits_module="nothing")
    probe = ForwardProbe(model, lambda: True, print, logits_module="head")
    x = tensors(3, 4, seed=60)
    scores = model(x)["scores"].detach()
    _, log_z = probe.take_step()
    assert float(log_z[1]) == pytest.approx(float(torch.logsumexp(scores.double(), -1).max()), rel=1e-6)


def test_a_failing_measurement_never_reaches_the_model(monkeypatch):
    from numwatch.capture import attention
    from numwatch.capture.forward_probe import ForwardProbe

    torch.manual_seed(0)
    model = NanoGPT()
    idx = torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    expected, _ = model(idx)

    def broken(*args, **kwargs):
        raise RuntimeError("measurement bug")

    monkeypatch.setattr(attention, "_max_logits", broken)
    failures: list[str] = []
    probe = ForwardProbe(model, lambda: True, failures.append)
    torch.manual_seed(1)
    logits, _ = model(idx)
    assert torch.equal(logits, expected)
    assert failures == ["attention capture"]  # the forward's four calls are measured together, at its end
    assert probe.take_step() == ({}, None)  # a partly measured step is not recorded
    assert not torch.overrides._get_current_function_mode_stack()
    probe.remove()
