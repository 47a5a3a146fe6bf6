"""The Triton victim kernel (`lshe.victim_kernel`) equals the torch rule (`lshe.victims.protected_argmin`
and `EvictingLayer.write_state`'s validity and recent-list writes), and the attention-free policies
take it on a GPU with the generic path's victims.

On a GPU these run on CUDA tensors; without one they run on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` and triton imports (slow: a few cases only), else they are skipped.
"""

from __future__ import annotations

import pytest
import torch

from lshe import victim_kernel, victims
from lshe.cache import EvictingCache
from policies.base import SlotView
from policies.knorm import KNormPolicy
from policies.random import RandomPolicy, hash_base
from policies.streaming import StreamingPolicy

ON_GPU = victim_kernel.triton is not None and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (ON_GPU or victim_kernel.interpreted()),
    reason="the victim kernel needs triton and a CUDA GPU, or TRITON_INTERPRET=1 with triton installed",
)


def random_state(generator, batch, heads, slots, recent, full):
    score = torch.randint(-3, 3, (batch, heads, slots), generator=generator).float()  # many ties
    if full:
        usable = torch.ones(batch, 1, slots, dtype=torch.bool)
        valid = torch.ones(batch, heads, slots, dtype=torch.bool)
    else:
        capacity = torch.randint(1, slots + 1, (batch,), generator=generator)
        usable = (torch.arange(slots)[None, :] < capacity[:, None])[:, None, :]
        valid = (torch.rand(batch, heads, slots, generator=generator) < 0.8) & usable
    recent_slots = torch.randint(0, slots + 1, (batch, heads, recent), generator=generator)
    return [t.to(DEVICE) for t in (score, valid, usable, recent_slots)]


@pytest.mark.parametrize(
    ("slots", "recent", "sink", "full"),
    [(40, 4, 3, False), (40, 4, 3, True), (37, 0, 0, False), (1500, 10, 4, False), (1500, 10, 4, True)],
)
def test_kernel_equals_torch_rule_and_writes(slots, recent, sink, full):
    generator = torch.Generator().manual_seed(slots + recent + sink + full)
    batch, heads = 3, 2
    for trial in range(4 if not ON_GPU else 30):
        score, valid, usable, recent_slots = random_state(generator, batch, heads, slots, recent, full)
        expected = victims.protected_argmin(score, valid, ~usable, recent_slots, sink, all_valid=full)
        valid_ref, recent_ref = valid.clone(), recent_slots.clone()
        valid_ref.scatter_(2, expected, True)
        victims.push_recent(recent_ref, expected)
        got = victim_kernel.protected_argmin_write(score, valid, usable, recent_slots, sink)
        assert torch.equal(got, expected), trial
        assert torch.equal(valid, valid_ref), trial
        assert torch.equal(recent_slots, recent_ref), trial


def test_kernel_without_write_changes_nothing():
    generator = torch.Generator().manual_seed(5)
    score, valid, usable, recent_slots = random_state(generator, 2, 2, 50, 4, False)
    before = (valid.clone(), recent_slots.clone())
    got = victim_kernel.protected_argmin_write(score, valid, usable, recent_slots, 4, write=False)
    assert torch.equal(got, victims.protected_argmin(score, valid, ~usable, recent_slots, 4, False))
    assert torch.equal(valid, before[0]) and torch.equal(recent_slots, before[1])


class HighNormFirst(KNormPolicy):
    """knorm's opposite through `score` alone: its inherited stored score must not be used."""

    name = "high_norm_first"

    def score(self, view):
        return view.features["norm"]


class ShiftedRandom(RandomPolicy):
    """Random over shifted positions: the hash must take the new token's stored position, not the layer's."""

    def token_features(self, layer_idx, keys, positions):
        return super().token_features(layer_idx, keys, positions + 1000)


class Int32Random(RandomPolicy):
    """int32 positions: not what the kernel hashes, so the generic path (the same victims)."""

    def token_features(self, layer_idx, keys, positions):
        return {"position": super().token_features(layer_idx, keys, positions)["position"].int()}


class AliasedStreaming(StreamingPolicy):
    """Two features holding the same tensor object: the kernel writes one, the layer the other."""

    def token_features(self, layer_idx, keys, positions):
        position = super().token_features(layer_idx, keys, positions)["position"]
        return {"position": position, "written_at": position}


@pytest.mark.parametrize(
    "policy_class",
    [RandomPolicy, KNormPolicy, StreamingPolicy, HighNormFirst, ShiftedRandom, Int32Random, AliasedStreaming],
)
@pytest.mark.parametrize("prompt", [96, 70])  # full (every step evicts), and empty slots first
def test_policies_take_the_kernel_with_the_generic_victims(policy_class, prompt, monkeypatch):
    if not ON_GPU:  # the layer takes the kernel on CUDA tensors only; the interpreter runs it on CPU
        monkeypatch.setattr(victim_kernel, "applies", lambda tensor: True)
    batch, heads, group, dim, slots = 3, 2, 4, 64, 96
    generator = torch.Generator(device=DEVICE).manual_seed(prompt)
    caches = [
        EvictingCache(policy_class(), budget=slots, sink=4, recent=10, prefill="streaming", fused=fused)
        for fused in (True, False)
    ]
    keys = torch.randn(batch, heads, prompt, dim, generator=generator, device=DEVICE)
    values = torch.randn(keys.shape, generator=generator, device=DEVICE)
    query = torch.randn(batch, heads * group, prompt, dim, generator=generator, device=DEVICE)
    for cache in caches:
        cache.update(keys, values, 0)
        cache.layers[0].attend(query, None, 1.0)
    calls = {"n": 0}
    real = victim_kernel.protected_argmin_write

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    victim_kernel.protected_argmin_write = counting
    try:
        for step in range(30):
            q = torch.randn(batch, heads * group, 1, dim, generator=generator, device=DEVICE)
            k = torch.randn(batch, heads, 1, dim, generator=generator, device=DEVICE)
            v = torch.randn(k.shape, generator=generator, device=DEVICE)
            for cache in caches:
                cache.update(k, v, 0)
                cache.layers[0].attend(q, None, 1.0)
            fast, reference = caches[0].layers[0], caches[1].layers[0]
            assert torch.equal(fast.keys, reference.keys), step
            assert torch.equal(fast.valid, reference.valid), step
            assert torch.equal(fast.recent_slots, reference.recent_slots), step
            for name in reference.features:
                assert torch.equal(fast.features[name], reference.features[name]), (name, step)
    finally:
        victim_kernel.protected_argmin_write = real
    assert calls["n"] == 30


@pytest.mark.parametrize(
    ("policy", "feature"),
    [
        (KNormPolicy(), "norm"),
        (StreamingPolicy(), "position"),
        (RandomPolicy(seed=0), "position"),
        (RandomPolicy(seed=-7), "position"),  # a negative seed: its int64 bits, as the torch hash
        (RandomPolicy(seed=2**40 + 3), "position"),
    ],
)
@pytest.mark.parametrize("full", [False, True])
def test_feature_scores_equal_the_policy_scores(policy, feature, full):
    """A policy's `stored_score`, computed inside the kernel, picks the victims of its `score` and
    stores the new token's feature value in the victim slot; positions span more than 32 bits."""
    generator = torch.Generator().manual_seed(11 + full)
    batch, heads, slots, recent, sink, layer_idx = 3, 2, 700, 10, 4, 5
    for trial in range(2 if not ON_GPU else 20):
        _, valid, usable, recent_slots = random_state(generator, batch, heads, slots, recent, full)
        keys = torch.randn(batch, heads, slots, 8, generator=generator).to(DEVICE)
        positions = torch.randint(-5, 2**33, (batch, slots), generator=generator).to(DEVICE)
        features = policy.token_features(layer_idx, keys, positions)
        new_position = torch.randint(0, 2**33, (batch, 1), generator=generator).to(DEVICE)
        new_key = torch.randn(batch, heads, 1, 8, generator=generator).to(DEVICE)
        new_features = policy.token_features(layer_idx, new_key, new_position)
        view = SlotView(layer_idx, keys, keys, valid, features, keys[:, :1], new_key, new_features)
        expected = victims.protected_argmin(
            policy.score(view).float(), valid, ~usable, recent_slots, sink, full
        )
        expected_feature = features[feature].clone()
        expected_feature.scatter_(2, expected, new_features[feature].to(expected_feature.dtype))
        stored = policy.stored_score()
        score = victim_kernel.FeatureScore(
            features[feature].contiguous(),
            new_features[feature],
            sign=stored.sign,
            hash_base=None if stored.hash_seed is None else hash_base(stored.hash_seed, layer_idx),
        )
        got = victim_kernel.protected_argmin_write(score, valid, usable, recent_slots, sink)
        assert torch.equal(got, expected), trial
        assert torch.equal(score.feature, expected_feature), trial


def test_feature_score_refuses_a_feature_of_another_shape():
    valid = torch.ones(1, 2, 8, dtype=torch.bool, device=DEVICE)
    usable = torch.ones(1, 1, 8, dtype=torch.bool, device=DEVICE)
    recent = torch.full((1, 2, 2), 8, device=DEVICE)
    score = victim_kernel.FeatureScore(
        torch.zeros(1, 2, 8, 3, device=DEVICE), torch.zeros(1, 2, 1, 3, device=DEVICE)
    )
    with pytest.raises(ValueError, match="FeatureScore's feature must be contiguous, of shape"):
        victim_kernel.protected_argmin_write(score, valid, usable, recent, 0)
