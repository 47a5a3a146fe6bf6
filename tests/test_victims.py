"""`lshe.victims`: the few-operation victim choice equals the generic rule, and LSH-E's torch fast step
(CPU) chooses the generic torch path's victims and leaves the same cache state."""

from __future__ import annotations

import math

import pytest
import torch

from lshe import victims
from lshe.cache import EvictingCache
from lshe.hashing import hamming, simhash
from policies.lshe import LSHEPolicy


def reference_argmin(score, valid, usable, recent_slots, sink):
    """The rule as stated: empty usable slots first, +inf on protected (valid) and unusable slots."""
    batch, heads, slots = valid.shape
    protected = torch.zeros(batch, heads, slots, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for s in recent_slots[b, h].tolist():
                if s < slots:
                    protected[b, h, s] = True
    protected[..., :sink] = True
    masked = torch.where(valid, score.float(), -math.inf)
    masked = masked.masked_fill((valid & protected) | ~usable, math.inf)
    out = torch.empty(batch, heads, 1, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            row = masked[b, h].tolist()
            out[b, h, 0] = row.index(min(row))  # the first (lowest) slot among the minima
    return out


@pytest.mark.parametrize("all_valid", [False, True])
@pytest.mark.parametrize("sink", [0, 3])
@pytest.mark.parametrize("recent", [0, 4])
def test_protected_argmin_equals_the_rule(all_valid, sink, recent):
    generator = torch.Generator().manual_seed(sink * 10 + recent + all_valid)
    batch, heads, slots = 4, 3, 40
    for trial in range(30):
        score = torch.randint(-3, 3, (batch, heads, slots), generator=generator).float()  # many ties
        if all_valid:
            valid = torch.ones(batch, heads, slots, dtype=torch.bool)
            usable = torch.ones(batch, 1, slots, dtype=torch.bool)
        else:
            capacity = torch.randint(1, slots + 1, (batch,), generator=generator)
            usable = (torch.arange(slots)[None, :] < capacity[:, None])[:, None, :]
            valid = (torch.rand(batch, heads, slots, generator=generator) < 0.8) & usable
            if trial % 3 == 0:  # every usable slot valid: the victim is an unprotected one, or slot 0
                valid = usable.expand(batch, heads, slots).clone()
        recent_slots = torch.randint(0, slots + 1, (batch, heads, recent), generator=generator)
        expected = reference_argmin(score, valid, usable, recent_slots, sink)
        got = victims.protected_argmin(score, valid, ~usable, recent_slots, sink, all_valid)
        assert torch.equal(got, expected), trial


@pytest.mark.parametrize("proj_dim", [1, 7, 8, 12, 16, 24, 32, 40])
@pytest.mark.parametrize("probes", [1, 3, 4])
def test_lshe_scores_equal_summed_hamming(proj_dim, probes):
    generator = torch.Generator().manual_seed(proj_dim * 10 + probes)
    batch, heads, slots, dim = 2, 3, 50, 16
    projection = torch.randn(dim, proj_dim, generator=generator)
    codes = simhash(torch.randn(batch, heads, slots, dim, generator=generator), projection)
    probe_x = torch.randn(batch, heads, probes, dim, generator=generator)
    expected = -hamming(simhash(probe_x, projection)[:, :, :, None, :], codes[:, :, None]).sum(2).float()
    got = victims.lshe_scores((probe_x @ projection) >= 0, codes)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("group", "proj_dim", "probe", "slots", "prompt", "recent"),
    [
        (3, 16, "query", 48, 48, 10),  # full cache: every step evicts
        (3, 16, "key", 48, 48, 10),
        (1, 8, "query", 40, 40, 0),
        (4, 24, "query", 60, 60, 5),
        (2, 40, "query", 30, 30, 10),  # codes longer than the Triton kernel's 32 bits
        (3, 16, "query", 48, 30, 10),  # empty slots are taken first
    ],
)
def test_torch_fast_step_equals_generic_path(group, proj_dim, probe, slots, prompt, recent):
    batch, heads, dim, sink = 3, 2, 32, 4
    generator = torch.Generator().manual_seed(slots + proj_dim + group)
    caches = [
        EvictingCache(
            LSHEPolicy(proj_dim=proj_dim, probe=probe, seed=1),
            budget=slots,
            sink=sink,
            recent=recent,
            prefill="streaming",
            fused=fused,
        )
        for fused in (True, False)
    ]
    keys = torch.randn(batch, heads, prompt, dim, generator=generator)
    values = torch.randn(keys.shape, generator=generator)
    query = torch.randn(batch, heads * group, prompt, dim, generator=generator)
    for cache in caches:
        cache.update(keys, values, 0)
        cache.layers[0].attend(query, None, 1.0)
    calls = {"n": 0}
    real = victims.lshe_torch_step

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    victims.lshe_torch_step = counting
    try:
        for step in range(40):
            q = torch.randn(batch, heads * group, 1, dim, generator=generator)
            k = torch.randn(batch, heads, 1, dim, generator=generator)
            v = torch.randn(k.shape, generator=generator)
            outs = []
            for cache in caches:
                cache.update(k, v, 0)
                outs.append(cache.layers[0].attend(q, None, 1.0))
            fast, reference = caches[0].layers[0], caches[1].layers[0]
            assert torch.equal(fast.keys, reference.keys), step  # the same victims were overwritten
            assert torch.equal(fast.valid, reference.valid), step
            assert torch.equal(fast.features["codes"], reference.features["codes"]), step
            assert torch.equal(fast.recent_slots, reference.recent_slots), step
            assert torch.equal(outs[0], outs[1]), step
    finally:
        victims.lshe_torch_step = real
    assert calls["n"] == 40  # the fused=True cache took the fast step, the other the generic path


def test_fast_step_is_not_taken_where_it_does_not_apply():
    """Accumulated scores, norm-aware scores and subclasses keep the generic path."""
    layer = type("Layer", (), {})()
    query, key = torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8)
    assert LSHEPolicy(score_decay=0.5).fused_step(layer, query, key) is None
    assert LSHEPolicy(norm_aware=True).fused_step(layer, query, key) is None

    class Sub(LSHEPolicy):
        pass

    assert Sub().fused_step(layer, query, key) is None
