"""Policies: LSH-E against a brute-force reference, H2O against eager attention, seeds, arguments."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompts, tiny_llama
from lshe.cache import EvictingCache
from lshe.hashing import gaussian_projection, hamming, pack_bits, sign_bits, unpack_bits
from policies import POLICIES, make_policy
from policies.base import StoredScore, fused_step_in_range, stored_score_in_use
from policies.knorm import KNormPolicy
from policies.lshe import LSHEPolicy
from policies.random import RandomPolicy
from policies.streaming import StreamingPolicy


def test_pack_and_unpack_round_trip_and_hamming_counts_bits():
    bits = torch.rand(5, 7, 24) > 0.5
    codes = pack_bits(bits)
    assert codes.dtype == torch.uint8 and codes.shape == (5, 7, 3)
    assert torch.equal(unpack_bits(codes, 24), bits)
    other = torch.rand(5, 7, 24) > 0.5
    assert torch.equal(hamming(codes, pack_bits(other)), (bits != other).sum(-1).int())


@pytest.mark.parametrize("proj_dim", [4, 8, 16, 24, 32, 64])
def test_packed_code_size_is_proj_dim_over_8_bytes_per_token_per_kv_head(proj_dim):
    policy = LSHEPolicy(proj_dim=proj_dim)
    keys = torch.randn(2, 3, 10, 64)
    codes = policy.token_features(0, keys, torch.arange(10).expand(2, 10))["codes"]
    assert codes.dtype == torch.uint8
    assert codes.shape == (2, 3, 10, math.ceil(proj_dim / 8))


def brute_force_victim(keys, valid, probes, projection, protected):
    """Unpacked bits, explicit Hamming, loops: the slot with the largest summed distance, lowest on ties."""
    batch, heads, slots, _ = keys.shape
    victims = torch.empty(batch, heads, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            empty = [s for s in range(slots) if not valid[b, h, s]]
            if empty:
                victims[b, h] = empty[0]
                continue
            best, best_slot = -1, None
            for s in range(slots):
                if protected[s]:
                    continue
                key_bits = ((keys[b, h, s] @ projection) >= 0).tolist()
                distance = 0
                for probe in probes[b][h]:
                    probe_bits = ((probe @ projection) >= 0).tolist()
                    distance += sum(int(x != y) for x, y in zip(key_bits, probe_bits, strict=True))
                if distance > best:
                    best, best_slot = distance, s
            victims[b, h] = best_slot
    return victims


@pytest.mark.parametrize("probe", ["query", "key"])
@pytest.mark.parametrize("trial", range(3))
def test_lshe_victim_equals_brute_force_reference(probe, trial):
    torch.manual_seed(100 + trial)
    batch, heads, group, slots, dim, proj_dim = 2, 3, 2, 24, 16, 8
    sink, recent = 2, 3
    policy = LSHEPolicy(proj_dim=proj_dim, probe=probe, seed=trial)
    cache = EvictingCache(policy, budget=slots, sink=sink, recent=recent)
    prompt_keys = torch.randn(batch, heads, slots, dim)
    # Prefill exactly `slots` tokens through the layer API, then one decode step.
    cache.update(prompt_keys, torch.randn_like(prompt_keys), 0)
    layer = cache.layers[0]
    layer.attend(torch.randn(batch, heads * group, slots, dim), None, 1.0)
    cached = layer.keys.clone()
    query, new_key = torch.randn(batch, heads * group, 1, dim), torch.randn(batch, heads, 1, dim)
    cache.update(new_key, torch.randn_like(new_key), 0)
    layer.attend(query, None, 1.0)

    projection = gaussian_projection(dim, proj_dim, trial, 0)
    if probe == "query":
        probes = [[query[b, h * group : (h + 1) * group, 0] for h in range(heads)] for b in range(batch)]
    else:
        probes = [[new_key[b, h] for h in range(heads)] for b in range(batch)]
    protected = [s < sink or s >= slots - recent for s in range(slots)]  # prefill wrote tokens in order
    expected = brute_force_victim(
        cached, torch.ones(batch, heads, slots, dtype=torch.bool), probes, projection, protected
    )
    changed = (layer.keys != cached).any(-1)  # (B, H, S): exactly the victim slot changed
    assert torch.equal(changed.sum(-1), torch.ones(batch, heads, dtype=torch.long))
    assert torch.equal(changed.float().argmax(-1), expected)
    assert torch.equal(
        layer.keys[torch.arange(batch)[:, None], torch.arange(heads)[None], expected], new_key[:, :, 0]
    )


def test_lshe_hamming_estimates_the_angle():
    # Each bit differs with probability angle / pi: check on many random pairs.
    projection = gaussian_projection(64, 4096, seed=0, layer_idx=0)
    a, b = torch.randn(20, 64), torch.randn(20, 64)
    estimated = (
        hamming(pack_bits(sign_bits(a, projection)), pack_bits(sign_bits(b, projection))).float() / 4096
    )
    angle = torch.arccos(torch.nn.functional.cosine_similarity(a, b)) / math.pi
    assert (estimated - angle).abs().max() < 0.03


def test_h2o_accumulated_scores_equal_eager_attention_reference():
    model = tiny_llama()
    from lshe.attention import use_lshe_attention

    use_lshe_attention(model)
    (prompt,) = random_prompts([25], seed=7)
    new = 8
    cache = EvictingCache(make_policy("h2o"), budget=1.0, max_new_tokens=new)
    out = model.generate(prompt[None], max_new_tokens=new, do_sample=False, cache=cache)
    fed = out[:, :-1]  # the last generated token is never fed to the model

    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    attentions = eager(fed, output_attentions=True).attentions  # per layer (1, Hq, T, T)
    for layer_idx, weights in enumerate(attentions):
        per_kv_head = weights.reshape(1, 2, 2, fed.shape[1], fed.shape[1]).sum(dim=(2, 3))  # (1, H, T)
        acc = cache.layers[layer_idx].features["acc"][:, :, : fed.shape[1]]
        assert torch.allclose(acc.double(), per_kv_head, atol=1e-5), layer_idx


def test_same_seed_same_result_and_another_seed_changes_the_projection(model):
    (prompt,) = random_prompts([60], seed=8)

    def run(seed):
        cache = EvictingCache(make_policy("lshe", seed=seed), budget=16, max_new_tokens=20)
        out = model.generate(prompt[None], max_new_tokens=20, do_sample=False, cache=cache)
        return out, cache.layers[0].features["codes"].clone()

    first, codes = run(0)
    again, codes_again = run(0)
    assert torch.equal(first, again) and torch.equal(codes, codes_again)
    assert not torch.equal(gaussian_projection(16, 16, 0, 0), gaussian_projection(16, 16, 1, 0))
    assert not torch.equal(gaussian_projection(16, 16, 0, 0), gaussian_projection(16, 16, 0, 1))
    _, other_codes = run(1)
    assert not torch.equal(codes, other_codes)


def test_random_policy_is_reproducible_under_its_seed(model):
    (prompt,) = random_prompts([60], seed=9)

    def run(seed):
        cache = EvictingCache(make_policy("random", seed=seed), budget=16, max_new_tokens=20)
        model.generate(prompt[None], max_new_tokens=20, do_sample=False, cache=cache)
        return cache.layers[0].keys.clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def _splitmix64_reference(x: int) -> int:
    """splitmix64's output for state ``x`` (Vigna's reference, with Python integers mod 2**64)."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_random_scores_are_a_splitmix64_hash_of_the_decision():
    from policies.random import hash_scores, splitmix64

    # Published first outputs of splitmix64 seeded with 0 (states 0, golden, 2 * golden).
    states = torch.tensor([0, 0x9E3779B97F4A7C15 - (1 << 64)], dtype=torch.int64)
    assert [v & ((1 << 64) - 1) for v in splitmix64(states).tolist()] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
    ]
    generator = torch.Generator().manual_seed(0)
    cached = torch.randint(-50, 5000, (2, 3, 7), generator=generator)  # padding positions are negative
    current = torch.randint(0, 5000, (2, 1, 1), generator=generator)
    heads = torch.arange(3)[None, :, None]
    for seed, layer in ((0, 0), (7, 3), (2**40 + 5, 11)):
        scores = hash_scores(seed, layer, heads, current, cached)
        mask = (1 << 64) - 1
        for b, h, s in [(0, 0, 0), (1, 2, 6), (0, 1, 3), (1, 0, 5)]:
            value = _splitmix64_reference(seed & mask)
            for part in (layer, h, int(current[b, 0, 0]), int(cached[b, h, s])):
                value = _splitmix64_reference(value ^ (part & mask))
            assert float(scores[b, h, s]) == (value >> 40) / 2**24, (seed, layer, b, h, s)
    assert scores.dtype == torch.float32 and bool(((scores >= 0) & (scores < 1)).all())


@pytest.mark.parametrize(("seed", "layer"), [(0, 0), (-7, 5), (2**63 - 1, 31), (-(2**63), 2)])
def test_random_hash_base_is_the_chain_through_seed_and_layer(seed, layer):
    """What the GPU kernel continues from (`lshe.victim_kernel.FeatureScore`)."""
    from policies.random import hash_base

    mask = (1 << 64) - 1
    assert hash_base(seed, layer) == _splitmix64_reference(_splitmix64_reference(seed & mask) ^ layer)


def test_random_policy_needs_no_generator_and_ignores_other_rows():
    policy = make_policy("random", seed=3)
    keys = torch.randn(3, 2, 9, 8)
    positions = torch.tensor(
        [[-2, -1, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8], [-1, 0, 1, 2, 3, 4, 5, 6, 7]]
    )
    features = policy.token_features(4, keys, positions)
    new = policy.token_features(4, keys[:, :, :1], positions[:, -1:] + 1)
    from policies.base import SlotView

    def score(rows):
        view = SlotView(4, keys[rows], keys[rows], torch.ones(len(rows), 2, 9, dtype=torch.bool),
                        {n: f[rows] for n, f in features.items()}, keys[rows, :, :1].repeat(1, 2, 1, 1),
                        keys[rows, :, :1], {n: f[rows] for n, f in new.items()})  # fmt: skip
        return policy.score(view)

    together = score([0, 1, 2])
    for row in range(3):
        assert torch.equal(score([row])[0], together[row])
    assert not hasattr(policy, "generators")


def test_score_decay_accumulates_distances():
    policy = LSHEPolicy(proj_dim=8, probe="key", score_decay=0.5)
    cache = EvictingCache(policy, budget=30, sink=0, recent=0)
    keys = torch.randn(1, 1, 30, 8)
    cache.update(keys, keys, 0)
    cache.layers[0].attend(torch.randn(1, 1, 30, 8), None, 1.0)
    acc = cache.layers[0].features["acc"]
    assert torch.count_nonzero(acc) == 0
    for _ in range(2):
        k = torch.randn(1, 1, 1, 8)
        cache.update(k, k, 0)
        cache.layers[0].attend(torch.randn(1, 1, 1, 8), None, 1.0)
    assert torch.count_nonzero(acc) > 0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(proj_dim=0), "proj_dim"),
        (dict(proj_dim=8.5), "proj_dim"),
        (dict(probe="value"), "probe"),
        (dict(score_decay=1.0), "score_decay"),
        (dict(score_decay=-0.1), "score_decay"),
    ],
)
def test_bad_lshe_arguments_raise_one_clear_error(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LSHEPolicy(**kwargs)


def test_unknown_policy_name_lists_the_choices():
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("snapkvv")
    assert {"lshe", "h2o", "tova", "random", "full", "streaming", "knorm"} <= set(POLICIES)


def test_random_policys_compiled_hash_equals_the_eager_hash():
    """The CUDA path's compiled hash (one generated kernel) against the eager int64 arithmetic: the
    same scores bit for bit, for several layers, seeds and slot counts, from one compiled graph."""
    from policies.random import compiled_hash_scores, hash_scores

    compiled = compiled_hash_scores()
    generator = torch.Generator().manual_seed(0)
    for layer, seed, slots in ((0, 0, 100), (5, 7, 333), (31, 2**40, 1000)):
        cached = torch.randint(0, 10**6, (2, 4, slots), generator=generator)
        current = torch.randint(0, 10**6, (2, 4, 1), generator=generator)
        heads = torch.arange(4)[None, :, None]
        expected = hash_scores(seed, layer, heads, current, cached)
        assert torch.equal(compiled(seed, layer, heads, current, cached), expected)


class _HighNormFirst(KNormPolicy):
    """Overrides knorm's score only: the inherited stored score describes its parent's rule."""

    name = "high_norm_first"

    def score(self, view):
        return view.features["norm"]


class _SeededKNorm(KNormPolicy):
    """Changes nothing about the score: the inherited stored score still describes it."""

    def describe(self) -> dict:
        return {"policy": self.name, "seeded": True}


def test_a_stored_score_is_used_only_with_the_score_it_describes():
    assert stored_score_in_use(KNormPolicy()) == StoredScore("norm", sign=-1.0)
    assert stored_score_in_use(StreamingPolicy()) == StoredScore("position")
    assert stored_score_in_use(RandomPolicy(seed=3)) == StoredScore("position", hash_seed=3)
    assert stored_score_in_use(_SeededKNorm()) == StoredScore("norm", sign=-1.0)
    assert stored_score_in_use(_HighNormFirst()) is None  # its own score: the generic path
    assert (
        stored_score_in_use(make_policy("lshe")) is None and stored_score_in_use(make_policy("h2o")) is None
    )


class _OwnStepLSHE(LSHEPolicy):
    """A user's own step on top of LSH-E: its slots are not known to lie in range."""

    def fused_step(self, layer, query, key):
        return None


class _TunedLSHE(LSHEPolicy):
    """LSH-E with another default: it keeps LSH-E's step, and its word on the slots."""


def test_only_the_class_that_defines_fused_step_vouches_for_its_slots():
    """The attention launch writes the slot unchecked only for these (`EvictingLayer.folds`)."""
    from policies.static import StaticControl

    assert fused_step_in_range(LSHEPolicy()) and fused_step_in_range(StaticControl())
    assert fused_step_in_range(_TunedLSHE())
    assert not fused_step_in_range(_OwnStepLSHE())  # an override does not inherit the parent's word
    assert not fused_step_in_range(KNormPolicy()) and not fused_step_in_range(make_policy("full"))


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 1.5, True])
def test_random_seed_outside_int64_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"):
        RandomPolicy(seed=seed)
