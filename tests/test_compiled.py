"""The compiled decode step (`lshe.compiled`, ``Decoder(compile=True)``) against the eager step and
against plain ``generate``: same greedy tokens, logits within float tolerance, the cache step eager."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import random_prompts, tiny_llama
from lshe.attention import use_lshe_attention
from lshe.cache import EvictingCache
from lshe.compiled import CompiledLayers, decoder_layers
from lshe.fast_decode import Decoder, greedy_generate
from policies import make_policy

STEPS = 16
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model32():
    """tiny-llama in float32 (inductor's CPU backend), 2 layers."""
    return use_lshe_attention(tiny_llama(seed=3).float())


@pytest.fixture(scope="module")
def compiled(model32):
    """One compilation shared by the tests (each new CompiledLayers would compile again)."""
    return CompiledLayers(model32)


def step_logits(model, cache, tokens, positions, compiled=None):
    """One decode step's logits (B, V), through the compiled layers when given."""
    active = compiled.active() if compiled is not None else contextlib.nullcontext()
    with torch.inference_mode(), active:
        out = model(input_ids=tokens, position_ids=positions, cache=cache, logits_to_keep=1)
    return out.logits[:, -1]


@pytest.mark.parametrize("name", ["lshe", "h2o", "full"])
def test_compiled_step_equals_eager_step(model32, compiled, name):
    """Two caches prefilled alike, decoded in lockstep, one eagerly and one compiled: every step's
    greedy token is the same, logits within float32 tolerance, the caches hold the same slots."""
    (prompt,) = random_prompts([48], seed=21)
    caches = [EvictingCache(make_policy(name), budget=24, max_new_tokens=STEPS) for _ in range(2)]
    with torch.inference_mode():
        firsts = [model32(prompt[None], cache=c, logits_to_keep=1).logits[:, -1] for c in caches]
    tokens = [f.argmax(-1, keepdim=True) for f in firsts]
    positions = torch.full((1, 1), 48)
    for _ in range(STEPS):
        eager = step_logits(model32, caches[0], tokens[0], positions)
        fast = step_logits(model32, caches[1], tokens[1], positions, compiled)
        torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)
        tokens = [eager.argmax(-1, keepdim=True), fast.argmax(-1, keepdim=True)]
        assert torch.equal(tokens[0], tokens[1])
        positions = positions + 1
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):  # the same tokens were evicted
        assert torch.equal(a.valid, b.valid)
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-4, atol=1e-4)
    # the compiled path really ran compiled graphs (two per layer class: before and after the cache step)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2


def test_one_compiled_graph_serves_every_layer(compiled, model32):
    """layer_idx is a graph input inside `CompiledLayers.active`: decoding through 6 layers compiles the
    layer's two graphs (and one recompile for the first layer index), not a pair per layer; and the
    setting does not leak out of the block."""
    from torch._dynamo.utils import counters

    model = use_lshe_attention(tiny_llama(seed=5, layers=6).float())
    layers = CompiledLayers(model)
    before = counters["stats"]["unique_graphs"]
    (prompt,) = random_prompts([30], seed=25)
    cache = EvictingCache(make_policy("lshe"), budget=16, max_new_tokens=6)
    with torch.inference_mode():
        first = model(prompt[None], cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    decoder = Decoder(model, cache, first, torch.full((1, 1), 30), compile=layers)
    for _ in range(4):
        decoder.step()
    # at most 4 for the layers (12 if one pair per layer), and one each for rotary embedding, final
    # norm, lm_head and argmax
    assert counters["stats"]["unique_graphs"] - before <= 4 + 4
    assert not torch._dynamo.config.allow_unspec_int_on_nn_module


def test_compiled_greedy_generate_equals_generate(model32, compiled):
    """A left-padded batch through the compiled decoder gives what plain ``generate`` gives."""
    prompts = random_prompts([40, 33], seed=22)
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 40 - len(p) :], mask[i, 40 - len(p) :] = p, 1
    expected = model32.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
        cache=EvictingCache(make_policy("lshe"), budget=24, max_new_tokens=12),
    )[:, 40:]  # fmt: skip
    cache = EvictingCache(make_policy("lshe"), budget=24, max_new_tokens=12)
    got = greedy_generate(model32, cache, ids, mask, 12, [], 0, compile=compiled)
    assert torch.equal(got, expected)


def test_compiled_layers_run_only_inside_active(model32, compiled):
    layers = decoder_layers(model32)
    assert len(layers) == 2 and all(layer._compiled_call_impl is None for layer in layers)
    with compiled.active():
        assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_compiled_layers_tune_with_coordinate_descent_by_default(model32, monkeypatch):
    """Inductor's coordinate-descent tuning (one-row products as tuned Triton reductions on a GPU) is
    on unless ``tune=False``; with a `torch.compile` mode, which takes no inductor options, it is off."""
    seen = []
    real = torch.compile

    def recording(fn, **kwargs):
        seen.append(kwargs)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    calls = len(CompiledLayers(model32).regions) + 1  # every region and the argmax
    seen.clear()
    CompiledLayers(model32)
    CompiledLayers(model32, tune=False)
    CompiledLayers(model32, mode="max-autotune-no-cudagraphs")
    assert [s["options"] for s in seen] == (
        [{"coordinate_descent_tuning": True}] * calls + [None] * calls + [None] * calls
    )
    assert [s["mode"] for s in seen[2 * calls :]] == ["max-autotune-no-cudagraphs"] * calls


def test_step_modules_are_compiled_regions_too(model32, compiled):
    """Rotary embedding, final norm and lm_head run compiled inside `active` (not the embedding)."""
    inner = model32.model
    assert compiled.regions[-3:] == [inner.rotary_emb, inner.norm, model32.lm_head]
    with compiled.active():
        assert all(m._compiled_call_impl is not None for m in compiled.regions)
        assert inner.embed_tokens._compiled_call_impl is None
    assert all(m._compiled_call_impl is None for m in compiled.regions)


def test_compiled_argmax_takes_the_first_maximum(compiled):
    """Ties go to the lowest index, as eager ``argmax`` (and so ``generate``) does."""
    logits = torch.zeros(3, 2, 50)
    logits[0, -1, [7, 30]] = 2.0
    logits[1, -1, [0, 49]] = 1.0
    logits[2, 0, 5] = 9.0  # not the last position
    logits[2, -1, 11] = -1.0
    assert compiled.argmax(logits).tolist() == [[7], [0], [0]]
    torch.testing.assert_close(compiled.argmax(logits), logits[:, -1].argmax(-1, keepdim=True))


def test_compile_refuses_a_model_without_decoder_layers():
    with pytest.raises(ValueError, match="no decoder layers found"):
        CompiledLayers(torch.nn.Linear(2, 2))


def test_keys_changed_after_the_cache_update_are_refused(model32):
    """The attention function must attend over the keys the cache staged; a model that hands it other
    keys (which the compiled path could do if it copied them) gets an error, not plain attention."""
    from lshe import attention

    (prompt,) = random_prompts([20], seed=23)
    cache = EvictingCache(make_policy("full"), max_new_tokens=4)
    module = model32.model.layers[0].self_attn
    key = torch.zeros(1, 2, 1, 16)
    cache.update(key, key, 0)
    with pytest.raises(RuntimeError, match="other keys than the evicting cache staged"):
        attention.lshe_attention(module, torch.zeros(1, 4, 1, 16), key.clone(), key, None)
    assert cache.layers[0].pending is None


@pytest.fixture(scope="module")
def cuda_layers():
    """float32 tiny-llama on the GPU and its compiled layers, one pair per products setting, compiled
    once for every policy (the cache step runs outside the compiled regions)."""
    made = {}

    def get(products: str):
        if products not in made:
            model = use_lshe_attention(tiny_llama(seed=4, layers=4).to("cuda", torch.float32))
            made[products] = model, CompiledLayers(model, products=products)
        return made[products]

    return get


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("name", ["lshe", "random", "h2o"])
@pytest.mark.parametrize("products", ["inductor", "gemv"])
def test_compiled_graph_decoder_equals_eager_on_cuda(cuda_layers, name, products):
    """float32 tiny-llama on the GPU: 64 graph-replayed compiled steps give the eager decoder's tokens.

    float32, not bf16: a random-weight bf16 model's greedy tokens flip on any change of kernel (eager
    SDPA against Triton attention does it too); the bf16 check is the 8B-shape test below."""
    model, layers = cuda_layers(products)
    (prompt,) = random_prompts([200], seed=24)
    prompt = prompt.cuda()
    out = []
    for compile in (False, layers):
        cache = EvictingCache(make_policy(name), budget=96, max_new_tokens=70)
        with torch.inference_mode():
            first = model(prompt[None], cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        decoder = Decoder(model, cache, first, torch.full((1, 1), 200, device="cuda"), graph=True,
                          compile=compile, collect=True)  # fmt: skip
        while decoder.steps < 64:
            decoder.step()
        out.append(torch.cat(decoder.history, dim=1))
    assert torch.equal(out[0], out[1])


@pytest.mark.skipif(
    not CUDA, reason="the Llama-3.1-8B shape needs a CUDA GPU (48 GB: bf16 and float32 copies)"
)
@pytest.mark.parametrize("products", ["inductor", "gemv"])
def test_compiled_step_on_the_8b_shape_is_as_close_to_float32_as_eager(products):
    """Llama-3.1-8B shape, random bf16 weights, LSH-E at 0.3 of a 2k prompt, 16 decode steps fed the same
    tokens: the compiled bf16 step's logits are as close to a float32 copy of the model as the eager
    bf16 step's are (mean absolute error within 10%, and its greedy token agrees with float32's as
    often). Exact token equality is no criterion in bf16 on random weights: the logits of the top
    tokens are close, so the eager step itself disagrees with float32 on some tokens."""
    import copy

    import yaml

    from lshe.models import random_model

    spec = yaml.safe_load(open("conf/model/llama-3.1-8b-shape.yaml"))
    model, _ = random_model("llama-3.1-8b-shape", spec["config"], dtype="bfloat16", device="cuda")
    reference = copy.deepcopy(model).float()
    prompt = torch.randint(300, 100000, (1, 2048), generator=torch.Generator().manual_seed(5)).cuda()
    compiled = CompiledLayers(model, products=products)
    caches, tokens = [], None
    for m in (model, model, reference):
        cache = EvictingCache(make_policy("lshe"), budget=0.3, max_new_tokens=20)
        with torch.inference_mode():
            first = m(prompt, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        caches.append(cache)
        tokens = first if tokens is None else tokens
    positions = torch.full((1, 1), 2048, device="cuda")
    errors, agree = {"eager": [], "compiled": []}, {"eager": 0, "compiled": 0}
    for _ in range(16):
        exact = step_logits(reference, caches[2], tokens, positions).float()
        for name, cache, use in (("eager", caches[0], None), ("compiled", caches[1], compiled)):
            logits = step_logits(model, cache, tokens, positions, use).float()
            errors[name].append((logits - exact).abs().mean().item())
            agree[name] += int(logits.argmax(-1) == exact.argmax(-1))
        tokens = exact.argmax(-1, keepdim=True)  # every cache is fed the same tokens
        positions = positions + 1
    eager, fast = sum(errors["eager"]) / 16, sum(errors["compiled"]) / 16
    assert fast <= 1.1 * eager, (fast, eager)
    assert agree["compiled"] >= agree["eager"] - 1, agree


def test_runner_compile_refuses_a_model_without_decoder_layers():
    from runners import components
    from runners.config import ConfigError

    with pytest.raises(
        ConfigError, match="runner.compile=true: no decoder layers found .* runner.compile=false"
    ):
        components.compiled_layers(torch.nn.Linear(2, 2))
