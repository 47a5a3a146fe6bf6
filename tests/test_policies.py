"""Policies: LSH-E against a brute-force reference, H2O against eager attention, seeds, arguments."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompts, tiny_llama
from lshe.cache import EvictingCache
from lshe.hashing import gaussian_projection, hamming, pack_bits, sign_bits, unpack_bits
from policies import POLICIES, make_policy
from policies.lshe import LSHEPolicy


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
