"""Rows move together: beam search, num_return_sequences, row selection and repetition; and the
cache refuses modes it cannot follow (rolling back) and models that do not use its attention."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import left_pad, random_prompts, tiny_llama
from lshe.attention import ATTN_IMPLEMENTATION, restore_attention, use_lshe_attention
from lshe.cache import EvictingCache
from lshe.diagnostics import EvictionDiagnostics
from lshe.hashing import simhash
from policies import make_policy
from policies.lshe import LSHEPolicy

NEW = 10


@pytest.fixture(scope="module")
def reference():
    return tiny_llama()  # same weights as `model`, plain SDPA attention, no evicting cache


class PositionedLSHE(LSHEPolicy):
    """LSH-E that also stores each token's position, so that a slot can be traced to its token."""

    def token_features(self, layer_idx, keys, positions):
        features = super().token_features(layer_idx, keys, positions)
        features["position"] = positions[:, None, :].expand(keys.shape[:3]).clone()
        return features


class CheckEveryStep(LogitsProcessor):
    """After every forward call of generate, checks each row of the cache against the row's tokens.

    ``input_ids`` holds, per row, every token fed so far, in the order of the cache's rows (after the
    previous reorder); the reference model recomputes each row's first-layer keys from its own tokens
    (they depend on the tokens only), and every layer's codes are recomputed from its stored keys.
    """

    def __init__(self, cache, reference, n_pad, rows_per_prompt, diagnostics=False) -> None:
        self.cache, self.reference, self.n_pad = cache, reference, n_pad
        self.rows_per_prompt, self.diagnostics, self.steps = rows_per_prompt, diagnostics, 0

    def __call__(self, input_ids, scores):
        cache, policy = self.cache, self.cache.policy
        settings = cache.settings
        for row in range(input_ids.shape[0]):
            pad = int(self.n_pad[row // self.rows_per_prompt])
            tokens = input_ids[row, pad:]
            with torch.no_grad():
                true_keys = [
                    layer.keys[0] for layer in self.reference(tokens[None], use_cache=True).cache.layers
                ]
            fed = tokens.shape[0]
            expected_capacity = math.ceil(settings.budget * (fed - self.steps + NEW))  # prompt + new
            for layer_idx, layer in enumerate(cache.layers):
                valid, position = layer.valid[row], layer.features["position"][row]
                assert int(layer.next_position[row]) == fed
                assert int(layer.capacity[row]) == expected_capacity, (row, layer_idx)
                slots = valid.shape[-1]
                usable = torch.arange(slots) < expected_capacity
                assert torch.equal(layer.usable[row, 0], usable)
                assert bool((valid <= usable).all()) and int(valid.sum(-1).max()) <= expected_capacity
                projection = policy.projection(layer_idx, layer.keys.shape[-1], layer.keys.device)
                codes = simhash(layer.keys[row], projection)
                for h in range(valid.shape[0]):
                    held = position[h][valid[h]]
                    if layer_idx == 0:  # deeper keys depend on the (evicted) attention of the layers below
                        assert torch.allclose(layer.keys[row, h][valid[h]], true_keys[0][h, held], atol=1e-9)
                    assert torch.equal(codes[h][valid[h]], layer.features["codes"][row, h][valid[h]])
                    recent = position[h][layer.recent_slots[row, h]]
                    assert recent.tolist() == list(range(fed - settings.recent, fed)), (row, layer_idx, h)
                    assert set(range(settings.sink)) <= set(held.tolist())
                if self.diagnostics and layer_idx == 0:  # the shadow full cache follows its row too
                    assert torch.allclose(layer.shadow.keys[row, :, pad:], true_keys[0], atol=1e-9)
        self.steps += 1
        return scores


@pytest.mark.parametrize("diagnostics", [False, True])
def test_beam_search_moves_every_row_state_with_its_beam(model, reference, diagnostics):
    prompts = random_prompts([30, 22], seed=21)
    ids, mask = left_pad(prompts)
    kwargs = dict(budget=0.3, sink=2, recent=3, max_new_tokens=NEW)
    diag = EvictionDiagnostics()
    policy = PositionedLSHE(proj_dim=8)
    cache = diag.cache(policy, **kwargs) if diagnostics else EvictingCache(policy, **kwargs)
    check = CheckEveryStep(cache, reference, (mask == 0).sum(-1), 4, diagnostics)
    model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, num_beams=4, do_sample=False, cache=cache,
        logits_processor=LogitsProcessorList([check]),
    )  # fmt: skip
    assert check.steps == NEW
    assert cache.layers[0].keys.shape[0] == 8 and cache.slots() == math.ceil(0.3 * (30 + NEW))
    if diagnostics:
        assert diag.summary()["diag_lost_attention_mass"] > 0


@pytest.mark.parametrize("name", ["lshe", "h2o", "random"])
def test_beam_search_equals_plain_beam_search_when_budget_covers_the_sequence(model, reference, name):
    ids, mask = left_pad(random_prompts([30, 24], seed=22))
    settings = dict(
        max_new_tokens=NEW, num_beams=4, do_sample=False, attention_mask=mask, num_return_sequences=2
    )
    expected = reference.generate(ids, **settings)
    cache = EvictingCache(make_policy(name), budget=1.0, max_new_tokens=NEW)
    assert torch.equal(model.generate(ids, cache=cache, **settings), expected)


def test_num_return_sequences_with_sampling_equals_plain_generate(model, reference):
    ids, mask = left_pad(random_prompts([30, 24], seed=23))
    settings = dict(max_new_tokens=NEW, do_sample=True, top_k=0, attention_mask=mask, num_return_sequences=2)
    torch.manual_seed(5)
    expected = reference.generate(ids, **settings)
    torch.manual_seed(5)
    cache = EvictingCache(make_policy("lshe"), budget=1.0, max_new_tokens=NEW)
    assert torch.equal(model.generate(ids, cache=cache, **settings), expected)
    assert cache.layers[0].keys.shape[0] == 4


def prefilled(model, prompts, **kwargs) -> tuple[EvictingCache, torch.Tensor, torch.Tensor]:
    """A cache after the prompts' prefill, the greedy next token of each row, the attention mask."""
    ids, mask = left_pad(prompts)
    cache = EvictingCache(make_policy("lshe"), budget=20, max_new_tokens=NEW, **kwargs)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache).logits
    return cache, logits[:, -1:].argmax(-1), mask


def continue_greedy(model, cache, tokens, mask, steps: int = 6) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            logits = model(tokens, attention_mask=mask, position_ids=positions, cache=cache).logits
            tokens = logits[:, -1:].argmax(-1)
            out.append(tokens)
    return torch.cat(out, dim=1)


def test_batch_select_and_repeat_interleave_equal_a_cache_built_for_those_rows(model):
    prompts = random_prompts([35, 28, 41], seed=24)
    cache, tokens, mask = prefilled(model, prompts)
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)
    rows = [2, 2, 0, 0]
    got = continue_greedy(model, cache, tokens[rows], mask[rows])
    fresh, fresh_tokens, fresh_mask = prefilled(model, [prompts[i] for i in rows])
    expected = continue_greedy(model, fresh, fresh_tokens, fresh_mask)
    assert torch.equal(got, expected)
    for a, b in zip(cache.layers, fresh.layers, strict=True):
        assert torch.equal(a.capacity, b.capacity) and torch.equal(a.recent_slots, b.recent_slots)
        assert a.min_filled == b.min_filled and a.fill_limit == b.fill_limit


def test_rolling_back_is_refused_with_the_mode_named(model):
    (prompt,) = random_prompts([30], seed=25)
    cache, _, _ = prefilled(model, [prompt])
    cache.crop(0)  # nothing to remove: accepted
    with pytest.raises(ValueError, match="assisted / speculative decoding"):
        cache.crop(-2)
    assistant = tiny_llama()
    with pytest.raises(ValueError, match="[Aa]ssisted decoding"):
        model.generate(
            prompt[None], max_new_tokens=4, do_sample=False, assistant_model=assistant,
            cache=EvictingCache(make_policy("lshe"), budget=20, max_new_tokens=4),
        )  # fmt: skip


def test_cache_on_a_model_without_the_lshe_attention_is_refused(reference):
    (prompt,) = random_prompts([20], seed=26)
    assert reference.config._attn_implementation == "sdpa"
    cache = EvictingCache(make_policy("lshe"), budget=1.0, max_new_tokens=4)
    with pytest.raises(RuntimeError) as error:
        reference.generate(prompt[None], max_new_tokens=4, do_sample=False, cache=cache)
    message = str(error.value)
    assert "does not use the 'lshe' attention implementation" in message
    assert "load_model(..., attn_implementation='lshe')" in message
    assert "use_lshe_attention(model)" in message


def test_one_layer_model_is_refused_at_its_next_forward():
    model = tiny_llama(layers=1)
    (prompt,) = random_prompts([20], seed=27)
    cache = EvictingCache(make_policy("lshe"), budget=1.0, max_new_tokens=4)
    model(prompt[None], cache=cache)
    with pytest.raises(RuntimeError, match="does not use the 'lshe' attention"):
        model(prompt[None, :1], cache=cache)


def test_switching_to_the_lshe_attention_and_back():
    model = tiny_llama()
    (prompt,) = random_prompts([20], seed=28)
    with torch.no_grad():
        before = model(prompt[None]).logits
    assert use_lshe_attention(model) is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    cache = EvictingCache(make_policy("lshe"), budget=1.0, max_new_tokens=0)
    with torch.no_grad():
        assert torch.allclose(model(prompt[None], cache=cache).logits, before, atol=1e-10)
    assert restore_attention(model) is model
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(prompt[None]).logits, before)
