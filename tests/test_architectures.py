"""The architecture matrix: every supported model family generates exactly what plain `generate` does
(greedy, seeded sampling, beam search) when the budget covers the sequence; under eviction the slots
stay within the budget, every stored LSH code is its slot key's hash and sliding layers hold only
their window; families that cannot be supported are refused before any token is generated.

Models are tiny random ones built from transformers config classes (2 layers, 4 query heads sharing
2 KV heads, head_dim 16, float64 so that greedy ties never flip; gpt-oss in float32, as its MoE
has no float64). The reference is the same weights with transformers' ``eager`` attention (the only
built-in one with soft-capping and sinks) and its own cache. The results are tabled in
docs/architectures.md.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from lshe.attention import use_lshe_attention
from lshe.cache import PREFILL_STRATEGIES, EvictingCache
from policies import POLICIES, make_policy
from policies.lshe import LSHEPolicy

VOCAB, NEW, WINDOW = 256, 12, 16


def common(**overrides) -> dict:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,  # peaked enough attention that a wrong window or cap changes tokens
    )
    settings.update(overrides)
    return settings


SLIDING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])

# family -> (model class, config class, config arguments)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", common(head_dim=16)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", common()),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", common(head_dim=16)),
    "mistral": ("MistralForCausalLM", "MistralConfig", common(head_dim=16, sliding_window=WINDOW)),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        common(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=1.0, **SLIDING),
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        common(head_dim=16, query_pre_attn_scalar=16, **SLIDING),
    ),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", common()),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", common()),
    "gpt_oss": (  # alternating sliding layers, attention sinks; MoE, which runs in float32 only
        "GptOssForCausalLM",
        "GptOssConfig",
        common(head_dim=16, num_local_experts=4, num_experts_per_tok=2, **SLIDING),
    ),
    "gpt_neox": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {k: v for k, v in common().items() if k != "num_key_value_heads"},
    ),
}

# family -> (model class, config class, config arguments, the error text)
REFUSED = {
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        common(
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
        ),
        "multi-head latent attention",
    ),
    "gemma3_bidirectional": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        common(head_dim=16, query_pre_attn_scalar=16, use_bidirectional_attention=True, **SLIDING),
        "non-causal",
    ),
}

SLIDING_FAMILIES = {"mistral", "gemma2", "gemma3", "gpt_oss"}
FLOAT32_FAMILIES = {"gpt_oss"}  # transformers' grouped MoE matmul has no float64


def sliding_windows(model) -> dict[int, int]:
    """{layer index: window} of the model's sliding layers, read from its config as transformers does."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is None:
        return {}
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return {i: window for i, kind in enumerate(types) if kind == "sliding_attention"}


def build(model_class: str, config_class: str, arguments: dict, attn: str, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**arguments)
    with torch.device(device):  # random initialisation where the model will run
        model = getattr(transformers, model_class)(config).eval().to(dtype)
    model.generation_config.eos_token_id = None  # fixed lengths
    model.generation_config.pad_token_id = 0
    model.set_attn_implementation(attn)
    return model


@functools.cache
def models(family: str):
    """(the family's model on the ``lshe`` attention, the same weights on ``eager``)."""
    model_class, config_class, arguments = FAMILIES[family]
    dtype = torch.float32 if family in FLOAT32_FAMILIES else torch.float64
    pair = (build(model_class, config_class, arguments, "eager", dtype) for _ in range(2))
    model, reference = (make_sinks_matter(m) for m in pair)
    return use_lshe_attention(model), reference


def make_sinks_matter(model):
    """Attention sinks (gpt-oss) start near 0 in a random model; spread them so that they matter."""
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.nn.Parameter):
            with torch.no_grad():
                sinks.copy_(3 * torch.randn(sinks.shape, generator=generator) + 2)
    return model


def prompts(lengths=(40, 40), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts longer than the sliding window: (input_ids, attention_mask).

    The reference runs unpadded batches only: transformers' eager attention in float64 turns a
    padding row into NaN (its float64 mask minimum becomes -inf in the float32 softmax) and the NaN
    values then reach real rows; `test_left_padded_rows_equal_each_row_alone` covers padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, VOCAB, (n,), generator=generator)
        mask[row, -n:] = 1
    return ids, mask


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0),
    "beam4": dict(do_sample=False, num_beams=4),
}


def generate(model, ids, mask, mode: str, cache=None, new: int = NEW) -> torch.Tensor:
    torch.manual_seed(0)  # the same draws for both models when sampling
    kwargs = dict(MODES[mode])
    if cache is not None:
        kwargs["cache"] = cache
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, **kwargs)[:, ids.shape[1] :]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_generates_like_plain_generate_when_budget_covers_the_sequence(family, mode):
    model, reference = models(family)
    ids, mask = prompts()
    expected = generate(reference, ids, mask, mode)
    for budget in (1.0, ids.shape[1] + NEW):
        cache = EvictingCache(LSHEPolicy(), budget=budget, max_new_tokens=NEW)
        assert torch.equal(generate(model, ids, mask, mode, cache), expected), (family, mode, budget)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_rows_equal_each_row_alone(family):
    model, reference = models(family)
    ids, mask = prompts((40, 27, 33))
    cache = EvictingCache(LSHEPolicy(), budget=1.0, max_new_tokens=NEW)
    batched = generate(model, ids, mask, "greedy", cache)
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        expected = generate(reference, alone, torch.ones_like(alone), "greedy")
        assert torch.equal(batched[row : row + 1], expected), (family, row)


@pytest.mark.parametrize("family", sorted(SLIDING_FAMILIES))
def test_lshe_attention_without_the_cache_honours_window_and_softcap(family):
    """A model switched to ``lshe`` but run with transformers' own cache is plain attention."""
    model, reference = models(family)
    ids, mask = prompts()
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        expected = reference(ids, attention_mask=mask).logits
    # eager computes its softmax in float32 even for a float64 model: agreement to float32 rounding
    # (ignoring the window or the cap gives differences of order 1).
    assert (got - expected).abs().max() < 1e-5


class CheckedLSHE(LSHEPolicy):
    """LSH-E that, before every decode decision, checks the layer it is shown against first principles:
    each valid slot's code is the hash of the slot's key, no row holds more than its capacity, and on
    a sliding layer every valid slot is inside the window of the token being added. It stores each
    token's position as an extra feature for the last check."""

    def __init__(self, windows: dict[int, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.windows, self.cache, self.steps = windows, None, 0

    def token_features(self, layer_idx, keys, positions):
        features = super().token_features(layer_idx, keys, positions)
        features["position"] = positions[:, None, :].expand(keys.shape[:3]).clone()
        return features

    def check(self, layer_idx, keys, valid, features, newest=None) -> None:
        codes = LSHEPolicy.token_features(self, layer_idx, keys, None)["codes"]
        same = (codes == features["codes"]).all(-1)
        assert bool((same | ~valid).all()), (
            f"layer {layer_idx}: {int((~same & valid).sum())} codes not their key's"
        )
        capacity = self.cache.layers[layer_idx].capacity
        if capacity is not None and capacity.shape[0] == valid.shape[0]:
            held = valid.sum(-1)  # (B, H)
            assert bool((held <= capacity.to(held.device)[:, None]).all()), (layer_idx, held, capacity)
        if layer_idx in self.windows and newest is not None:
            position = torch.where(valid, features["position"], newest)
            assert bool((position > newest - self.windows[layer_idx]).all()), (
                f"layer {layer_idx} out of window"
            )

    def score(self, view):
        if view.queries.shape[2] == 1:  # a decode step (a window prefill probes with several queries)
            newest = view.new_features["position"][:, :, -1:]  # the token about to be written
            self.check(view.layer_idx, view.keys, view.valid, view.features, newest)
            self.steps += 1
        return super().score(view)


def check_evicting_run(family: str, mode: str, budget, prefill: str = "window", **settings) -> None:
    model, _ = models(family)
    ids, mask = prompts((60, 47))
    policy = CheckedLSHE(sliding_windows(model), proj_dim=8)
    cache = EvictingCache(policy, budget=budget, prefill=prefill, max_new_tokens=NEW, **settings)
    policy.cache = cache
    generate(model, ids, mask, mode, cache)
    assert policy.steps > 0
    rows = ids.shape[0] * (4 if mode == "beam4" else 1)
    for layer_idx, layer in enumerate(cache.layers):
        limit = int(layer.capacity.max())
        if layer_idx in policy.windows:  # a sliding layer never holds more than its window
            assert limit <= policy.windows[layer_idx]
        assert layer.keys.shape[0] == rows and layer.keys.shape[2] <= limit, (layer_idx, layer.keys.shape)
        assert int(layer.valid.sum(-1).max()) <= limit
        last = ids.shape[1] - (mask == 0).sum(-1) + NEW - 2  # position of the last token fed, per row
        last = last.repeat_interleave(rows // ids.shape[0])[:, None, None]
        policy.check(layer_idx, layer.keys, layer.valid, layer.features, last)


@pytest.mark.parametrize("mode", ["greedy", "beam4"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_under_eviction_keeps_budget_codes_and_window(family, mode):
    check_evicting_run(family, mode, budget=0.3)


@pytest.mark.parametrize("prefill", PREFILL_STRATEGIES)
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_layers_hold_only_their_window_under_every_prefill(family, prefill):
    # 13 slots (< the window of 16): sliding layers must evict inside their window too.
    check_evicting_run(family, "greedy", budget=13, prefill=prefill, sink=2, recent=4)


@pytest.mark.parametrize("prefill", PREFILL_STRATEGIES)
def test_all_sliding_model_is_exact_when_budget_covers_the_window(prefill):
    """Mistral slides on every layer: a budget of at least the window loses nothing, however the
    prompt (longer than the budget) is compressed."""
    model, reference = models("mistral")
    ids, mask = prompts()
    expected = generate(reference, ids, mask, "greedy")
    cache = EvictingCache(LSHEPolicy(), budget=24, prefill=prefill, max_new_tokens=NEW)
    assert torch.equal(generate(model, ids, mask, "greedy", cache), expected)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_family_is_refused_before_any_token(family):
    model_class, config_class, arguments, text = REFUSED[family]
    model = use_lshe_attention(build(model_class, config_class, arguments, "eager", torch.float32))
    ids, mask = prompts()
    cache = EvictingCache(LSHEPolicy(), budget=1.0, max_new_tokens=NEW)
    with pytest.raises(ValueError, match=text):
        model.generate(ids, attention_mask=mask, max_new_tokens=NEW, cache=cache)
    assert not cache.layers or all(getattr(layer, "keys", None) is None for layer in cache.layers)


def test_attention_dropout_in_training_is_refused():
    model_class, config_class, arguments = FAMILIES["llama"]
    model = use_lshe_attention(
        build(model_class, config_class, dict(arguments, attention_dropout=0.1), "eager")
    )
    ids, mask = prompts()
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(ids, attention_mask=mask, cache=EvictingCache(LSHEPolicy(), budget=1.0, max_new_tokens=0))


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "mistral"])
def test_every_policy_is_exact_on_sliding_and_softcapped_layers_when_budget_covers_the_sequence(family, name):
    """Every attention path (SDPA, the explicit weights of H2O/TOVA) and both slot rules (evicting,
    and the full cache's growing one) honour the window, the cap and the sinks."""
    model, reference = models(family)
    ids, mask = prompts()
    expected = generate(reference, ids, mask, "greedy")
    for max_new in (NEW, None):  # None: the full cache grows its slots as it goes
        if max_new is None and POLICIES[name].evicts:
            continue
        cache = EvictingCache(make_policy(name), budget=1.0, max_new_tokens=max_new)
        assert torch.equal(generate(model, ids, mask, "greedy", cache), expected), (family, name, max_new)
        for layer_idx in sliding_windows(model):  # a sliding layer never allocates beyond its window
            assert cache.layers[layer_idx].keys.shape[2] <= WINDOW, (name, layer_idx)


@pytest.mark.parametrize("prefill", PREFILL_STRATEGIES)
@pytest.mark.parametrize("name", ["h2o", "tova", "streaming"])
def test_mistral_is_exact_for_every_policy_and_prefill_when_budget_covers_the_window(name, prefill):
    model, reference = models("mistral")
    ids, mask = prompts()
    expected = generate(reference, ids, mask, "greedy")
    cache = EvictingCache(make_policy(name), budget=24, prefill=prefill, max_new_tokens=NEW)
    assert torch.equal(generate(model, ids, mask, "greedy", cache), expected)


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """Every tensor a layer holds (attributes and the policy's feature buffers)."""
    found = {name: t for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}
    found.update({f"features[{name}]": t for name, t in layer.features.items()})
    return found


DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_layer_allocates_every_tensor_on_its_keys_device(device, window):
    """A model split over devices gives each layer's keys on that layer's device: the layer's slots,
    validity, features, capacities and positions must all follow them (no default device anywhere)."""
    generator = torch.Generator().manual_seed(0)
    cache = EvictingCache(LSHEPolicy(), budget=12, sink=2, recent=3, max_new_tokens=4, fused=False)
    for length in (20, 1, 1):  # a prompt longer than the budget, then two decode steps
        query = torch.randn(2, 4, length, 16, generator=generator).to(device)
        key, value = (torch.randn(2, 2, length, 16, generator=generator).to(device) for _ in range(2))
        cache.update(key, value, 0)
        cache.layers[0].attend(query, None, 0.25, window=window)
    tensors = layer_tensors(cache.layers[0])
    assert {"keys", "values", "valid", "capacity", "next_position", "features[codes]"} <= set(tensors)
    if window is not None:
        assert "slot_position" in tensors and cache.layers[0].keys.shape[2] == window
    wrong = {name: str(t.device) for name, t in tensors.items() if t.device != torch.device(device)}
    assert not wrong, wrong


def split_over(model, first, second) -> None:
    """accelerate's dispatch, as ``device_map`` does it: embeddings and the first half of the layers
    on ``first``, the rest on ``second``, with hooks that move each module's inputs to its device."""
    import accelerate

    layers = model.config.num_hidden_layers
    device_map = {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        "model.norm": second,
        "lm_head": second,
    }
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        device_map["lm_head"] = (
            first  # tied weights live once, with the embeddings (as accelerate places them)
        )
    device_map.update({f"model.layers.{i}": first if i < layers // 2 else second for i in range(layers)})
    accelerate.dispatch_model(
        model, device_map=device_map, skip_keys=list(model._skip_keys_device_placement), force_hooks=True
    )


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_model_dispatched_by_accelerate_generates_like_the_plain_model(family):
    """On CPU both halves are one device, but accelerate's hooks (which move every input to each
    module's device, the cache excepted) run as in a real split."""
    model_class, config_class, arguments = FAMILIES[family]
    _, reference = models(family)
    model = use_lshe_attention(build(model_class, config_class, dict(arguments), "eager"))
    split_over(model, "cpu", "cpu")
    assert hasattr(model.model.layers[0], "_hf_hook")  # really dispatched
    ids, mask = prompts()
    cache = EvictingCache(LSHEPolicy(), budget=1.0, max_new_tokens=NEW)
    assert torch.equal(generate(model, ids, mask, "greedy", cache), generate(reference, ids, mask, "greedy"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one model split over both)")
@pytest.mark.parametrize(
    ("model_class", "config_class", "arguments"),
    [
        pytest.param(  # Llama-3.1-8B's shape, 4 layers: GQA 32/8, head_dim 128, 128k vocabulary
            "LlamaForCausalLM",
            "LlamaConfig",
            common(
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=4,
                num_attention_heads=32,
                num_key_value_heads=8,
                initializer_range=0.02,
            ),
            id="llama-3.1-8b-shape",
        ),
        pytest.param(
            *FAMILIES["gemma2"][:2],
            dict(FAMILIES["gemma2"][2], num_hidden_layers=4, layer_types=SLIDING["layer_types"] * 2),
            id="gemma2",
        ),
    ],
)
def test_model_split_over_two_gpus_generates_like_one_gpu(model_class, config_class, arguments):
    tokens = {}
    for split in (False, True):
        model = use_lshe_attention(
            build(model_class, config_class, arguments, "eager", torch.bfloat16, "cuda:0")
        )
        if split:
            split_over(model, 0, 1)
        ids = torch.randint(3, VOCAB, (2, 300), generator=torch.Generator().manual_seed(0)).to("cuda:0")
        cache = EvictingCache(LSHEPolicy(), budget=0.3, max_new_tokens=32)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, cache=cache)
        tokens[split] = out.cpu()
        if split:
            devices = {str(layer.keys.device) for layer in cache.layers}
            assert devices == {"cuda:0", "cuda:1"}, devices
            for layer, module in zip(cache.layers, model.model.layers, strict=True):
                assert layer.keys.device == next(module.parameters()).device
        del model, cache
        torch.cuda.empty_cache()
    assert torch.equal(tokens[True], tokens[False])


@pytest.mark.parametrize("family", sorted(SLIDING_FAMILIES))
def test_window_first_crossed_during_decode_is_exact(family):
    """A prompt shorter than the window: the first tokens leave it while decoding (slots are reused
    in place), and the full cache grows its slots up to the window and no further."""
    model, reference = models(family)
    ids, mask = prompts((6, 6))
    new = 3 * WINDOW
    expected = generate(reference, ids, mask, "greedy", new=new)
    cases = [("lshe", 1.0, new), ("full", 1.0, None)]
    if len(sliding_windows(model)) == model.config.num_hidden_layers:  # every layer slides (Mistral)
        cases.append(("lshe", WINDOW + 4, new))  # more than the window, much less than the sequence
    for name, budget, max_new in cases:
        cache = EvictingCache(make_policy(name), budget=budget, max_new_tokens=max_new)
        assert torch.equal(generate(model, ids, mask, "greedy", cache, new=new), expected), (name, budget)
        sliding = sliding_windows(model)
        for layer_idx, layer in enumerate(cache.layers):
            if layer_idx in sliding:
                assert layer.keys.shape[2] == WINDOW, (name, layer_idx, layer.keys.shape)


@pytest.mark.parametrize("prefill", PREFILL_STRATEGIES)
@pytest.mark.parametrize("name", ["lshe", "h2o"])
def test_left_padded_sliding_rows_equal_each_row_alone_under_every_prefill(name, prefill):
    """Mistral (every layer sliding) at a budget above the window is exact for a left-padded batch
    whose prompts are longer than the budget or much shorter than the others (their padding then
    reaches past the sequential strategy's prefix), whichever way the prompt is compressed."""
    model, reference = models("mistral")
    ids, mask = prompts((40, 9, 3, 33))
    cache = EvictingCache(make_policy(name), budget=24, prefill=prefill, max_new_tokens=NEW)
    batched = generate(model, ids, mask, "greedy", cache)
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        expected = generate(reference, alone, torch.ones_like(alone), "greedy")
        assert torch.equal(batched[row : row + 1], expected), (prefill, row)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sequential_prefill_of_rows_differing_by_more_than_the_budget_equals_each_row_alone(family):
    """The sequential strategy feeds the prompt past its common prefix through decode steps; a row
    still in its left padding there must not write its padding into its slots."""
    model, _ = models(family)
    ids, mask = prompts((40, 9, 3, 33))
    settings = dict(budget=20, prefill="sequential", max_new_tokens=NEW)
    batched = generate(model, ids, mask, "greedy", EvictingCache(LSHEPolicy(), **settings))
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        expected = generate(
            model, alone, torch.ones_like(alone), "greedy", EvictingCache(LSHEPolicy(), **settings)
        )
        assert torch.equal(batched[row : row + 1], expected), row


def test_cache_reports_the_full_layers_budget_when_layer_0_slides():
    """Gemma2's layer 0 slides (at most 16 slots); the cache's capacity and slots are the budget's."""
    model, _ = models("gemma2")
    ids, mask = prompts((60, 60))
    cache = EvictingCache(LSHEPolicy(), budget=30, max_new_tokens=NEW)
    generate(model, ids, mask, "greedy", cache)
    assert cache.layers[0].keys.shape[2] == WINDOW and cache.layers[1].keys.shape[2] == 30
    assert cache.slots() == 30 and cache.capacity.tolist() == [30, 30]


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_diagnostics_refuse_layers_they_do_not_model(family):
    """Eviction diagnostics compare with plain causal attention: a sliding or soft-capped layer would
    give wrong diagnostics, so they refuse before any token is generated."""
    from lshe.diagnostics import EvictionDiagnostics

    model, _ = models(family)
    ids, mask = prompts()
    cache = EvictionDiagnostics().cache(LSHEPolicy(), budget=0.5, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="diagnostics do not model"):
        generate(model, ids, mask, "greedy", cache)


@pytest.mark.parametrize(
    "family",
    ["llama", "gemma2", "gemma3", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gpt_oss", "gpt_neox"],
)
@pytest.mark.parametrize("products", ["inductor", "gemv"])
def test_compiled_decode_steps_generate_like_plain_generate(family, products):
    """Sliding windows, soft-capped logits and other layer classes through the compiled decoder layers
    (`lshe.compiled`, q/k/v fused where the family has three projections, with a bias in Qwen2, with
    q/k norms in Qwen3 and OLMo2; with ``products="gemv"`` every plain Linear of the layers through
    `lshe.one_row_products`, gate/up stacked, Phi3's fused ones and GPT-NeoX's as they are): the
    greedy tokens of ``generate`` with the same evicting cache settings."""
    from lshe.compiled import CompiledLayers
    from lshe.fast_decode import greedy_generate

    model, _ = models(family)
    ids, mask = prompts()
    expected = generate(
        model, ids, mask, "greedy", EvictingCache(make_policy("lshe"), budget=24, max_new_tokens=NEW)
    )
    cache = EvictingCache(make_policy("lshe"), budget=24, max_new_tokens=NEW)
    got = greedy_generate(
        model, cache, ids, mask, NEW, [], 0, compile=CompiledLayers(model, products=products)
    )
    assert torch.equal(got, expected)
