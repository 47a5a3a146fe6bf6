"""The evicting cache: exactness without eviction, budgets, protection, batching, positions, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import left_pad, random_prompts, tiny_llama
from lshe import slot_attention
from lshe.cache import PREFILL_STRATEGIES, EvictingCache
from policies import POLICIES, make_policy
from policies.lshe import LSHEPolicy

NEW = 12


def generate(model, ids, cache=None, attention_mask=None, new=NEW, **kwargs):
    kwargs.setdefault("do_sample", False)
    if cache is not None:
        kwargs["cache"] = cache
    out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new, **kwargs)
    return out[:, ids.shape[1] :]


@pytest.fixture(scope="module")
def reference():
    return tiny_llama()  # same weights as `model`, plain SDPA attention, no evicting cache


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_matches_plain_generate_when_budget_covers_the_sequence(model, reference, name):
    (prompt,) = random_prompts([40])
    expected = generate(reference, prompt[None])
    for budget in (1.0, 40 + NEW):
        cache = EvictingCache(make_policy(name), budget=budget, max_new_tokens=NEW)
        assert torch.equal(generate(model, prompt[None], cache), expected), (name, budget)


def test_sampling_runs_and_respects_the_budget(model):
    (prompt,) = random_prompts([30])
    cache = EvictingCache(make_policy("lshe"), budget=20, max_new_tokens=NEW)
    torch.manual_seed(0)
    out = generate(model, prompt[None], cache, do_sample=True, top_k=20)
    assert out.shape == (1, NEW)
    assert cache.slots() == 20


class PositionTracking(LSHEPolicy):
    """LSH-E that also stores each token's position as a feature, to check the cache's bookkeeping."""

    def __init__(self, sink: int, recent: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sink, self.recent, self.steps = sink, recent, 0

    def token_features(self, layer_idx, keys, positions):
        features = super().token_features(layer_idx, keys, positions)
        features["position"] = positions[:, None, :].expand(keys.shape[:3]).clone()
        return features

    def score(self, view):
        # Before every decision: the sinks and the `recent` last tokens must all still be cached.
        held = torch.where(view.valid, view.features["position"], -1)
        newest = view.new_features["position"][:, :, -1:]  # the token being added
        for b in range(held.shape[0]):
            for h in range(held.shape[1]):
                kept = set(held[b, h].tolist())
                must = set(range(self.sink)) | set(range(int(newest[b, h]) - self.recent, int(newest[b, h])))
                assert must <= kept, (b, h, sorted(must - kept))
        self.steps += 1
        return super().score(view)


@pytest.mark.parametrize("prefill", PREFILL_STRATEGIES)
def test_cache_never_exceeds_budget_and_never_evicts_sink_or_recent(model, prefill):
    sink, recent, budget = 4, 6, 20
    prompts = random_prompts([35, 50])
    ids, mask = left_pad(prompts)
    policy = PositionTracking(sink, recent, proj_dim=8)
    cache = EvictingCache(
        policy, budget=budget, sink=sink, recent=recent, prefill=prefill, max_new_tokens=NEW
    )
    generate(model, ids, cache, attention_mask=mask, new=25)
    assert policy.steps > 0
    for layer in cache.layers:
        assert layer.keys.shape == (2, 2, budget, 16) and layer.values.shape == (2, 2, budget, 16)
        assert int(layer.valid.sum(-1).max()) == budget
        for feature in layer.features.values():
            assert feature.shape[2] == budget
    # At the end the sinks and the most recent tokens are in every layer, row and head.
    for layer in cache.layers:
        position = torch.where(layer.valid, layer.features["position"], -1)
        for b, prompt in enumerate(prompts):
            last = len(prompt) + 25 - 2  # the last token fed to the model
            for h in range(2):
                kept = set(position[b, h].tolist())
                assert set(range(sink)) | set(range(last - recent + 1, last + 1)) <= kept


def test_fraction_budget_is_per_row_and_rounds_up(model):
    prompts = random_prompts([20, 60])
    ids, mask = left_pad(prompts)
    cache = EvictingCache(make_policy("lshe"), budget=0.5, max_new_tokens=NEW)
    generate(model, ids, cache, attention_mask=mask)
    assert cache.capacity.tolist() == [16, 36]  # ceil(0.5 * (20 + 12)), ceil(0.5 * (60 + 12))
    counts = cache.valid_counts()  # (layers, B, H)
    assert counts[:, 0].max() <= 16 and counts[:, 1].max() <= 36
    assert cache.slots() == 36


@pytest.mark.parametrize("prefill", PREFILL_STRATEGIES)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_batch_rows_equal_single_generation_with_eviction(model, name, prefill):
    """Every built-in policy (random included: it hashes what identifies a decision) decides each row
    as if the row were alone: batch_size never changes a prediction."""
    assert POLICIES[name].deterministic
    prompts = random_prompts([30, 45, 38], seed=3)
    ids, mask = left_pad(prompts)
    settings = dict(budget=24, prefill=prefill, max_new_tokens=16)
    batched = generate(model, ids, EvictingCache(make_policy(name), **settings), attention_mask=mask, new=16)
    for i, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], EvictingCache(make_policy(name), **settings), new=16)
        assert torch.equal(batched[i], alone[0]), (name, prefill, i)


def test_eviction_changes_the_output_of_a_small_budget(model, reference):
    (prompt,) = random_prompts([60], seed=4)
    full = generate(reference, prompt[None], new=20)
    evicted = generate(
        model, prompt[None], EvictingCache(make_policy("streaming"), budget=16, max_new_tokens=20), new=20
    )
    assert not torch.equal(full, evicted)


def test_positions_continue_from_tokens_seen_not_slots_kept(model):
    (prompt,) = random_prompts([30])
    cache = EvictingCache(make_policy("lshe"), budget=16, max_new_tokens=NEW)
    generate(model, prompt[None], cache)
    assert cache.get_seq_length() == 30 + NEW - 1
    assert cache.slots() == 16
    assert all(int(layer.next_position[0]) == 30 + NEW - 1 for layer in cache.layers)


def test_plain_forward_calls_stream_tokens_through_the_decode_path(model, reference):
    (tokens,) = random_prompts([50], seed=5)
    cache = EvictingCache(make_policy("lshe"), budget=24, prefill="sequential", max_new_tokens=0)
    chunked = [model(tokens[None, :30], cache=cache).logits]
    chunked.append(model(tokens[None, 30:], cache=cache).logits)
    assert cache.get_seq_length() == 50 and cache.slots() == 24
    one_call = model(
        tokens[None],
        cache=EvictingCache(make_policy("lshe"), budget=24, prefill="sequential", max_new_tokens=0),
    ).logits
    # Feeding a long text at once with prefill="sequential" equals feeding it in pieces.
    assert torch.allclose(torch.cat(chunked, dim=1), one_call, atol=1e-10)
    # The prefix that fits is exact.
    assert torch.allclose(one_call[:, :24], reference(tokens[None, :24]).logits, atol=1e-10)


def test_full_policy_grows_instead_of_evicting(model, reference):
    (tokens,) = random_prompts([40], seed=6)
    cache = EvictingCache(make_policy("full"))  # no max_new_tokens: storage grows
    model(tokens[None, :10], cache=cache)
    logits = model(tokens[None, 10:], cache=cache).logits
    assert int(cache.valid_counts().min()) == 40
    assert torch.allclose(logits, reference(tokens[None]).logits[:, 10:], atol=1e-10)


def test_policies_without_attention_weights_use_fused_sdpa(model, monkeypatch):
    calls = {"sdpa": 0}
    real_sdpa = slot_attention.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("attention weights were materialised for a policy that needs none")

    monkeypatch.setattr(slot_attention, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(slot_attention, "grouped_attention", forbidden)
    (prompt,) = random_prompts([30])
    for name, cls in POLICIES.items():
        if not cls.needs_attention:
            generate(model, prompt[None], EvictingCache(make_policy(name), budget=16, max_new_tokens=NEW))
    assert calls["sdpa"] > 0


def test_kv_bytes_reported_match_tensors(model):
    (prompt,) = random_prompts([40])
    cache = EvictingCache(make_policy("lshe", proj_dim=16), budget=20, max_new_tokens=NEW)
    generate(model, prompt[None], cache)
    sizes = cache.nbytes()
    per_layer_kv = 2 * (1 * 2 * 20 * 16) * 8  # keys + values, float64
    assert sizes["kv"] == 2 * per_layer_kv
    assert sizes["features"] == 2 * (1 * 2 * 20 * 2)  # 16 bits = 2 bytes per token per KV head
    assert sizes["total"] == sizes["kv"] + sizes["features"] + sizes["bookkeeping"]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(budget=0), "budget"),
        (dict(budget=-0.2), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(budget=True), "budget"),
        (dict(budget="half"), "budget"),
        (dict(budget=14), "budget"),  # not larger than sink + recent = 14
        (dict(budget=0.3), "max_new_tokens"),
        (dict(budget=64, sink=-1), "sink"),
        (dict(budget=64, recent=2.5), "recent"),
        (dict(budget=64, prefill="snapkv"), "prefill"),
        (dict(budget=64, window=0), "window"),
    ],
)
def test_bad_cache_arguments_raise_one_clear_error(kwargs, key):
    with pytest.raises(ValueError, match=key):
        EvictingCache(make_policy("lshe"), **kwargs)


def test_fraction_budget_too_small_for_sink_and_recent_is_refused_at_prefill(model):
    (prompt,) = random_prompts([10])
    cache = EvictingCache(make_policy("lshe"), budget=0.2, max_new_tokens=4)  # ceil(0.2 * 14) = 3 slots
    with pytest.raises(ValueError, match="budget=0.2 gives 3 slots"):
        generate(model, prompt[None], cache, new=4)


def test_right_padding_is_refused(model):
    ids, mask = left_pad(random_prompts([10, 12]))
    with pytest.raises(ValueError, match="left padding"):
        model(ids.flip(-1), attention_mask=mask.flip(-1), cache=EvictingCache(make_policy("lshe"), budget=64))


def test_an_all_ones_mask_prefills_with_causal_sdpa_not_an_explicit_mask(model, monkeypatch):
    """A batch without padding passed with its all-ones mask (as `generate` and the fast decoder do) takes
    SDPA's causal path (flash attention on a GPU); before, it built a (B, 1, L, L) mask and ran SDPA's
    masked kernels, 1.6x slower on an 8B model at 8k tokens. A padded batch still gets its mask."""
    masks = []
    real = slot_attention.prompt_attention

    def spy(query, key, value, mask, *args, **kwargs):
        masks.append(mask)
        return real(query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(slot_attention, "prompt_attention", spy)
    ids, mask = left_pad(random_prompts([12, 12]))
    assert bool(mask.all())
    with torch.no_grad():
        given = model(ids, attention_mask=mask, cache=EvictingCache(make_policy("lshe"), budget=64)).logits
        assert all(m is None for m in masks)
        plain = model(ids, cache=EvictingCache(make_policy("lshe"), budget=64)).logits
        assert torch.equal(given, plain)
        masks.clear()
        ids, mask = left_pad(random_prompts([10, 12]))
        model(ids, attention_mask=mask, cache=EvictingCache(make_policy("lshe"), budget=64))
        assert masks and all(m is not None for m in masks)


@pytest.mark.real_model
def test_every_policy_matches_plain_generate_on_smollm2():
    from lshe.models import load_model

    reference, tokenizer = load_model("smollm2-135m")
    model, _ = load_model("smollm2-135m", attn_implementation="lshe")
    text = "The quick brown fox jumps over the lazy dog. " * 6 + "Write one sentence about foxes."
    ids = tokenizer(text, return_tensors="pt").input_ids
    expected = generate(reference, ids, new=16)
    for name in sorted(POLICIES):
        cache = EvictingCache(make_policy(name), budget=1.0, max_new_tokens=16)
        assert torch.equal(generate(model, ids, cache, new=16), expected), name


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_matches_plain_generate_on_registered_tiny_llama(name):
    from lshe.models import load_model

    reference, tokenizer = load_model("tiny-llama")
    model, _ = load_model("tiny-llama", attn_implementation="lshe")
    inputs = tokenizer(
        ["Hello there, this is a test of the tiny model and its cache. " * 2], return_tensors="pt"
    )
    expected = reference.generate(**inputs, max_new_tokens=20, do_sample=False)
    cache = EvictingCache(make_policy(name), budget=1.0, max_new_tokens=20)
    assert torch.equal(model.generate(**inputs, max_new_tokens=20, do_sample=False, cache=cache), expected)


def test_cache_and_layers_are_freed_by_reference_counting_alone(model):
    import gc
    import weakref

    (prompt,) = random_prompts([30])
    cache = EvictingCache(make_policy("lshe"), budget=16, max_new_tokens=4)
    generate(model, prompt[None], cache, new=4)
    layer, whole = weakref.ref(cache.layers[0]), weakref.ref(cache)
    assert all(not hasattr(layer_, "cache") for layer_ in cache.layers)  # no back-pointer
    gc.disable()
    try:
        del cache
        assert whole() is None and layer() is None  # no reference cycle kept them alive
    finally:
        gc.enable()


def test_the_core_names_no_policy_outside_docstrings():
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "lshe").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.Name):
                text = node.id
            elif isinstance(node, ast.Attribute):
                text = node.attr
            elif isinstance(node, ast.alias):
                text = node.name
            elif (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            ):
                text = node.value
            assert not text or not any(n in text for n in ("LSHEPolicy", "RandomPolicy")), (path, text)
        assert "import policies.lshe" not in path.read_text() and "from policies.lshe" not in path.read_text()


def test_fused_step_hook_is_asked_when_fused_and_unobserved_and_none_means_the_generic_path(model):
    from lshe.diagnostics import EvictionDiagnostics
    from policies.knorm import KNormPolicy

    class Counting(KNormPolicy):
        calls = 0

        def fused_step(self, layer, query, key):
            type(self).calls += 1
            assert layer.valid.shape[:2] == layer.recent_slots.shape[:2] and layer.sink == 4
            return None

    (prompt,) = random_prompts([30], seed=14)
    outputs = {}
    for label, build in (
        ("fused", lambda p: EvictingCache(p, budget=16, max_new_tokens=NEW)),
        ("unfused", lambda p: EvictingCache(p, budget=16, max_new_tokens=NEW, fused=False)),
        ("observed", lambda p: EvictionDiagnostics().cache(p, budget=16, max_new_tokens=NEW)),
    ):
        Counting.calls = 0
        outputs[label] = generate(model, prompt[None], build(Counting()))
        assert Counting.calls == (2 * (NEW - 1) if label == "fused" else 0), label
    assert torch.equal(outputs["fused"], outputs["unfused"]) and torch.equal(
        outputs["fused"], outputs["observed"]
    )
