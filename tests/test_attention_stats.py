"""Attention with per-slot statistics in Triton (`lshe.attention_stats`) equals the explicit-weights path
(`lshe.slot_attention.grouped_attention`): at decode, output and attention summed over each KV group,
with masks, softcap and sinks; at prefill, the causal statistics of a plain prompt; and H2O/TOVA take
both on a GPU with the explicit path's statistics and victims.

On a GPU these run on CUDA tensors; without one they run on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` and triton imports (float32 only there), else they are skipped.
"""

from __future__ import annotations

import pytest
import torch

from lshe import attention_stats, kernels, slot_attention, victim_kernel
from lshe.cache import EvictingCache
from policies.h2o import H2OPolicy
from policies.tova import TOVAPolicy

ON_GPU = kernels.triton is not None and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (ON_GPU or victim_kernel.interpreted()),
    reason="the attention kernels need triton and a CUDA GPU, or TRITON_INTERPRET=1 with triton installed",
)


@pytest.mark.parametrize(
    ("group", "slots", "masked", "softcap", "sinks"),
    [
        (4, 100, False, None, False),
        (3, 300, True, None, False),
        (1, 70, True, 30.0, False),
        (2, 130, True, None, True),
        (4, 1000, False, 50.0, True),
    ],
)
def test_stats_equal_explicit_weights(group, slots, masked, softcap, sinks):
    generator = torch.Generator(device=DEVICE).manual_seed(slots + group)
    batch, heads, dim = 2, 2, 64
    query = torch.randn(batch, heads * group, 1, dim, generator=generator, device=DEVICE)
    keys = torch.randn(batch, heads, slots, dim, generator=generator, device=DEVICE)
    values = torch.randn(keys.shape, generator=generator, device=DEVICE)
    valid = torch.rand(batch, heads, slots, generator=generator, device=DEVICE) < 0.7
    valid[1, 0] = False  # a (row, KV head) with nothing valid: zero output, zero attention
    sink = torch.randn(heads * group, generator=generator, device=DEVICE) if sinks else None
    mask = valid if masked else torch.ones_like(valid)
    scale = dim**-0.5
    out, attention = attention_stats.decode_attention_with_stats(
        query, keys, values, valid if masked else None, scale, softcap, sink
    )
    if masked:
        mask[1, 0] = False
    expected_out, expected_sum, _ = slot_attention.grouped_attention(
        query.double(),
        keys.double(),
        values.double(),
        mask[:, :, None, :],
        scale,
        softcap=softcap,
        sinks=sink,
    )
    if masked:  # the explicit path gives NaN where nothing is valid (softmax of -inf only)
        expected_out = torch.nan_to_num(expected_out)
        expected_sum = torch.nan_to_num(expected_sum)
    assert torch.allclose(out.double(), expected_out, atol=2e-5, rtol=1e-4)
    assert torch.allclose(attention.double(), expected_sum.double(), atol=2e-6, rtol=1e-4)
    assert not attention[~mask].any()


@pytest.mark.parametrize("policy_class", [H2OPolicy, TOVAPolicy])
def test_h2o_tova_take_the_kernel_with_the_explicit_victims(policy_class, monkeypatch):
    if not ON_GPU:  # the layer takes the kernels on CUDA tensors only; the interpreter runs them on CPU
        monkeypatch.setattr(attention_stats, "applies", lambda query, keys: True)
        monkeypatch.setattr(attention_stats, "prompt_applies", lambda query, key: True)
        monkeypatch.setattr(victim_kernel, "applies", lambda tensor: True)
    prompt_calls = {"n": 0}
    real_prompt = attention_stats.prompt_attention_stats

    def counting_prompt(*args, **kwargs):
        prompt_calls["n"] += 1
        return real_prompt(*args, **kwargs)

    monkeypatch.setattr(attention_stats, "prompt_attention_stats", counting_prompt)
    batch, heads, group, dim, slots, prompt = 2, 2, 4, 64, 48, 48
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    caches = [
        EvictingCache(policy_class(), budget=slots, sink=4, recent=6, prefill="streaming", fused=fused)
        for fused in (True, False)
    ]
    keys = torch.randn(batch, heads, prompt, dim, generator=generator, device=DEVICE)
    values = torch.randn(keys.shape, generator=generator, device=DEVICE)
    query = torch.randn(batch, heads * group, prompt, dim, generator=generator, device=DEVICE)
    for cache in caches:
        cache.update(keys, values, 0)
        cache.layers[0].attend(query, None, dim**-0.5)
    assert prompt_calls["n"] == 1  # the fused cache's prefill took the flash-style statistics
    name = next(iter(caches[1].layers[0].features))
    assert torch.allclose(caches[0].layers[0].features[name], caches[1].layers[0].features[name], atol=1e-5)
    calls = {"n": 0}
    real = attention_stats.decode_attention_with_stats

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_stats, "decode_attention_with_stats", counting)
    steps = 12
    for step in range(steps):
        q = torch.randn(batch, heads * group, 1, dim, generator=generator, device=DEVICE)
        k = torch.randn(batch, heads, 1, dim, generator=generator, device=DEVICE)
        v = torch.randn(k.shape, generator=generator, device=DEVICE)
        outs = []
        for cache in caches:
            cache.update(k, v, 0)
            outs.append(cache.layers[0].attend(q, None, dim**-0.5))
        fast, reference = caches[0].layers[0], caches[1].layers[0]
        assert torch.equal(fast.keys, reference.keys), step  # same victims (random scores: no near ties)
        assert torch.equal(fast.valid, reference.valid), step
        name = next(iter(reference.features))
        assert torch.allclose(fast.features[name], reference.features[name], atol=1e-5), step
        assert torch.allclose(outs[0], outs[1], atol=1e-5), step
    assert calls["n"] == steps


@pytest.mark.parametrize(("group", "length"), [(1, 64), (3, 100), (4, 150)])
def test_prompt_stats_equal_explicit_weights(group, length):
    generator = torch.Generator(device=DEVICE).manual_seed(length + group)
    batch, heads, dim = 2, 2, 32
    query = torch.randn(batch, heads * group, length, dim, generator=generator, device=DEVICE)
    key = torch.randn(batch, heads, length, dim, generator=generator, device=DEVICE)
    value = torch.randn(key.shape, generator=generator, device=DEVICE)
    causal = torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()[None, None]
    scale = dim**-0.5
    attn_sum, attn_last = attention_stats.prompt_attention_stats(query, key, scale)
    _, expected_sum, expected_last = slot_attention.grouped_attention(
        query.double(), key.double(), value.double(), causal, scale
    )
    assert torch.allclose(attn_sum.double(), expected_sum.double(), atol=1e-5, rtol=1e-4)
    assert torch.allclose(attn_last.double(), expected_last.double(), atol=1e-6, rtol=1e-4)
