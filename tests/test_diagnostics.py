"""Diagnostics: lost attention mass, victim rank and score/logit correlation against a shadow full cache."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompts
from lshe.cache import EvictingCache
from lshe.diagnostics import EvictionDiagnostics
from policies import make_policy
from policies.base import EvictionPolicy, SlotView


class EvictMostAttended(EvictionPolicy):
    """Adversarial policy: keep-score = minus the current query's attention logit (evicts the best)."""

    name = "anti_oracle"

    def score(self, view: SlotView) -> torch.Tensor:
        batch, heads = view.valid.shape[:2]
        q = view.queries.reshape(batch, heads, -1, view.queries.shape[-1])
        return -torch.einsum("bhgd,bhsd->bhs", q, view.keys).float()


class EvictLeastAttended(EvictMostAttended):
    """Oracle: evicts the token with the lowest current logit."""

    name = "oracle"

    def score(self, view: SlotView) -> torch.Tensor:
        return -super().score(view)


def diagnose(model, policy, budget=40, new=24, prompt_len=60, prefill="streaming"):
    (prompt,) = random_prompts([prompt_len], seed=11)
    diagnostics = EvictionDiagnostics()
    cache = diagnostics.cache(policy, budget=budget, max_new_tokens=new, prefill=prefill)
    model.generate(prompt[None], max_new_tokens=new, do_sample=False, cache=cache)
    return diagnostics.summary()


def test_evicting_the_most_attended_token_loses_more_attention_than_full_and_lshe(model):
    full = diagnose(model, make_policy("full"))
    lshe = diagnose(model, make_policy("lshe", proj_dim=16))
    adversary = diagnose(model, EvictMostAttended())
    assert full["diag_lost_attention_mass"] == pytest.approx(0.0, abs=1e-12)
    assert full["diag_evicted_attention_rank"] is None  # nothing was ever evicted
    assert adversary["diag_lost_attention_mass"] > lshe["diag_lost_attention_mass"] > 0
    assert adversary["diag_evicted_attention_rank"] > 0.9  # the victim is (almost) the top token
    assert adversary["diag_score_logit_corr"] < -0.9
    assert lshe["diag_hamming_logit_corr"] < 0  # larger distance, lower logit
    assert adversary["diag_hamming_logit_corr"] is None  # only reported for LSH-E


def test_oracle_evicts_the_least_attended_token(model):
    # The oracle scores with the raw logit q.k; the diagnostic ranks by softmax probability averaged
    # over the group's query heads: same order for each head, so the rank is near 0.
    oracle = diagnose(model, EvictLeastAttended())
    assert oracle["diag_evicted_attention_rank"] < 0.1
    assert oracle["diag_score_logit_corr"] > 0.9


def test_diagnostics_follow_sequential_prefill_and_batches_merge(model):
    first = EvictionDiagnostics()
    (prompt,) = random_prompts([50], seed=12)
    cache = first.cache(make_policy("lshe"), budget=20, max_new_tokens=8, prefill="sequential")
    model.generate(prompt[None], max_new_tokens=8, do_sample=False, cache=cache)
    steps = first.counts["diag_lost_attention_mass"]
    assert steps == 2 * 2 * (50 - 20 + 7)  # layers x KV heads x decode-path tokens (prompt overflow + new)
    total = EvictionDiagnostics()
    total.merge(first)
    total.merge(first)
    assert total.counts["diag_lost_attention_mass"] == 2 * steps
    assert math.isclose(
        total.summary()["diag_lost_attention_mass"], first.summary()["diag_lost_attention_mass"]
    )


def test_one_diagnostics_object_reports_over_many_caches_without_changing_outputs(model):
    prompts = random_prompts([50, 44], seed=13)
    diagnostics = EvictionDiagnostics()
    alone = EvictionDiagnostics()
    for i, prompt in enumerate(prompts):
        settings = dict(budget=20, max_new_tokens=8, prefill="streaming")
        cache = diagnostics.cache(make_policy("lshe"), **settings)
        assert isinstance(cache, EvictingCache)
        observed = model.generate(prompt[None], max_new_tokens=8, do_sample=False, cache=cache)
        plain = model.generate(
            prompt[None],
            max_new_tokens=8,
            do_sample=False,
            cache=EvictingCache(make_policy("lshe"), **settings),
        )
        assert torch.equal(observed, plain)  # diagnostics observe, they do not change the decisions
        if i == 0:
            alone.merge(diagnostics)
    steps = 2 * 2 * 7  # layers x KV heads x decode steps, per cache
    assert alone.counts["diag_lost_attention_mass"] == steps
    assert diagnostics.counts["diag_lost_attention_mass"] == 2 * steps
    assert diagnostics.summary()["diag_hamming_logit_corr"] is not None


def test_lost_attention_mass_is_the_true_attention_at_the_models_own_scale():
    """One decode step driven by hand at scaling 0.7 (not 1/sqrt(head_dim), as Gemma's is not): the
    lost mass equals softmax(0.7 q.k) over every token seen, summed over the tokens no longer cached,
    averaged over the group's query heads and the KV heads (an independent float64 computation)."""
    torch.manual_seed(0)
    batch, heads, group, dim, length, scale = 1, 2, 2, 16, 12, 0.7
    keys, values = torch.randn(batch, heads, length, dim), torch.randn(batch, heads, length, dim)
    diagnostics = EvictionDiagnostics()
    cache = diagnostics.cache(
        make_policy("knorm"), budget=8, sink=2, recent=2, prefill="streaming", max_new_tokens=1
    )
    cache.update(keys, values, 0)
    layer = cache.layers[0]
    layer.attend(torch.randn(batch, heads * group, length, dim), None, scale)
    query, key = torch.randn(batch, heads * group, 1, dim), torch.randn(batch, heads, 1, dim)
    cache.update(key, torch.randn(batch, heads, 1, dim), 0)
    layer.attend(query, None, scale)

    seen = torch.cat([keys, key], dim=2).double()  # (B, H, T, D): every token of the run
    q = query.reshape(batch, heads, group, dim).double()
    probs = torch.softmax(scale * torch.einsum("bhgd,bhtd->bhgt", q, seen), dim=-1).mean(dim=2)
    kept = layer.keys[layer.valid.bool()].reshape(batch, heads, -1, dim).double()
    cached = (seen[:, :, :, None, :] == kept[:, :, None, :, :]).all(-1).any(-1)  # (B, H, T)
    expected = (probs * ~cached).sum(-1).mean()
    assert cached.sum() == 8 * heads and expected > 0.05
    assert diagnostics.summary()["diag_lost_attention_mass"] == pytest.approx(float(expected), rel=1e-5)
