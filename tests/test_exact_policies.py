"""The exact limits (angle, dot) and norm-aware LSH-E: victims equal brute-force float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from lshe.cache import EvictingCache
from lshe.hashing import gaussian_projection
from policies.exact import AnglePolicy, DotPolicy
from policies.lshe import LSHEPolicy


def one_decode_step(policy, trial: int, batch=2, heads=3, group=2, slots=24, dim=16, sink=2, recent=3):
    """Prefill exactly `slots` random tokens through the layer API, decode one step; return
    (cached keys before the step, query, new key, the slot each (row, head) overwrote)."""
    torch.manual_seed(200 + trial)
    cache = EvictingCache(policy, budget=slots, sink=sink, recent=recent)
    prompt_keys = torch.randn(batch, heads, slots, dim) * (0.5 + torch.rand(batch, heads, slots, 1))
    cache.update(prompt_keys, torch.randn_like(prompt_keys), 0)
    layer = cache.layers[0]
    layer.attend(torch.randn(batch, heads * group, slots, dim), None, 1.0)
    cached = layer.keys.clone()
    query, new_key = torch.randn(batch, heads * group, 1, dim), torch.randn(batch, heads, 1, dim)
    cache.update(new_key, torch.randn_like(new_key), 0)
    layer.attend(query, None, 1.0)
    changed = (layer.keys != cached).any(-1)
    assert torch.equal(changed.sum(-1), torch.ones(batch, heads, dtype=torch.long))
    return cached, query, new_key, changed.float().argmax(-1)


def brute_force(cached, query, keep_score, sink=2, recent=3):
    """Loops over rows, KV heads and slots in float64: the unprotected slot with the lowest summed
    keep-score over the group's query heads, ties to the lowest slot."""
    batch, heads, slots, _ = cached.shape
    group = query.shape[1] // heads
    victims = torch.empty(batch, heads, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            best, best_slot = math.inf, None
            for s in range(sink, slots - recent):
                k = cached[b, h, s].double()
                total = sum(keep_score(query[b, h * group + g, 0].double(), k) for g in range(group))
                if total < best:
                    best, best_slot = total, s
            victims[b, h] = best_slot
    return victims


def angle_keep(q, k):
    return -math.acos(max(-1.0, min(1.0, float(q @ k / (q.norm() * k.norm())))))


@pytest.mark.parametrize("trial", range(3))
def test_angle_victim_equals_brute_force(trial):
    cached, query, _, victim = one_decode_step(AnglePolicy(), trial)
    assert torch.equal(victim, brute_force(cached, query, angle_keep))


@pytest.mark.parametrize("trial", range(3))
def test_dot_victim_equals_brute_force(trial):
    cached, query, _, victim = one_decode_step(DotPolicy(), trial)
    assert torch.equal(victim, brute_force(cached, query, lambda q, k: float(q @ k)))


@pytest.mark.parametrize("proj_dim", [8, 13])
@pytest.mark.parametrize("trial", range(3))
def test_norm_aware_lshe_victim_equals_brute_force(trial, proj_dim):
    cached, query, _, victim = one_decode_step(
        LSHEPolicy(proj_dim=proj_dim, seed=trial, norm_aware=True), trial
    )
    projection = gaussian_projection(cached.shape[-1], proj_dim, trial, 0).double()

    def keep(q, k):
        hamming = int(((q @ projection >= 0) != (k @ projection >= 0)).sum())
        norm = float(k.norm().to(torch.float16))  # stored as float16
        return norm * math.cos(math.pi * hamming / proj_dim)

    assert torch.equal(victim, brute_force(cached, query, keep))


def test_norm_aware_stores_two_bytes_per_token_head_and_counts_them():
    plain, aware = LSHEPolicy(proj_dim=16), LSHEPolicy(proj_dim=16, norm_aware=True)
    sizes = {}
    for policy in (plain, aware):
        cache = EvictingCache(policy, budget=20, sink=2, recent=3)
        keys = torch.randn(1, 3, 20, 16)
        cache.update(keys, keys, 0)
        cache.layers[0].attend(torch.randn(1, 6, 20, 16), None, 1.0)
        sizes[policy.norm_aware] = cache.nbytes()["features"]
        assert (
            cache.layers[0].features.get("norm", torch.zeros(0, dtype=torch.float16)).dtype == torch.float16
        )
    assert sizes[True] - sizes[False] == 1 * 3 * 20 * 2


def test_limits_at_a_window_prefill_ignore_padding_probes():
    from policies.base import SlotView

    torch.manual_seed(0)
    keys, queries = torch.randn(1, 2, 8, 4), torch.randn(1, 4, 3, 4)
    valid = torch.ones(1, 2, 8, dtype=torch.bool)
    probe_valid = torch.tensor([[False, True, True]])
    for policy in (AnglePolicy(), DotPolicy()):
        padded = SlotView(0, keys, keys, valid, {}, queries, keys[:, :, -3:], probe_valid=probe_valid)
        real = SlotView(0, keys, keys, valid, {}, queries[:, :, 1:], keys[:, :, -2:])
        assert torch.allclose(policy.score(padded), policy.score(real), atol=1e-6)


def test_norm_aware_refuses_score_decay():
    with pytest.raises(ValueError, match="norm_aware"):
        LSHEPolicy(norm_aware=True, score_decay=0.5)
