"""Decode steps outside `generate`: the eager `Decoder`, CUDA-graph replay, and the no-sync claim."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import random_prompts, tiny_llama
from lshe.attention import use_lshe_attention
from lshe.cache import EvictingCache
from lshe.fast_decode import Decoder
from policies import make_policy
from policies.static import StaticControl

NEW = 10
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs and sync checks need a CUDA GPU")


def prefill(model, prompt: torch.Tensor, cache: EvictingCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill one prompt; return the (1, 1) next token and its (1, 1) position."""
    with torch.inference_mode():
        logits = model(prompt[None], cache=cache, logits_to_keep=1).logits
    positions = torch.full((1, 1), prompt.shape[0], device=prompt.device)
    return logits[:, -1:].argmax(-1), positions


def decoded(model, prompt, cache, graph: bool = False) -> tuple[torch.Tensor, Decoder]:
    """Greedy tokens after the prompt, NEW in all; with ``graph`` only those of the replays (the
    capture's warm-up steps come first and are not collected)."""
    tokens, positions = prefill(model, prompt, cache)
    decoder = Decoder(model, cache, tokens, positions, graph=graph, warmup=2)
    out = [] if graph else [tokens]
    while decoder.steps < NEW - 1:
        decoder.step()
        out.append(decoder.tokens.clone())
    return torch.cat(out, dim=1), decoder


@pytest.mark.parametrize("name", ["lshe", "h2o", "full", "streaming"])
def test_eager_decoder_equals_generate(model, name):
    (prompt,) = random_prompts([40], seed=11)
    expected = model.generate(
        prompt[None], max_new_tokens=NEW, do_sample=False,
        cache=EvictingCache(make_policy(name), budget=24, max_new_tokens=NEW),
    )[0, 40:]  # fmt: skip
    cache = EvictingCache(make_policy(name), budget=24, max_new_tokens=NEW)
    tokens, decoder = decoded(model, prompt, cache)
    assert torch.equal(tokens[0], expected)
    assert cache.get_seq_length() == 40 + NEW - 1
    assert decoder.steps == NEW - 1


def test_host_state_round_trip_and_advance(model):
    (prompt,) = random_prompts([40], seed=12)
    cache = EvictingCache(make_policy("full"), max_new_tokens=8)
    tokens, positions = prefill(model, prompt, cache)
    state = cache.host_state()
    assert [s[0] for s in state] == [40, 40]
    Decoder(model, cache, tokens, positions).step()
    assert [s[0] for s in cache.host_state()] == [41, 41]
    cache.set_host_state(state)
    assert cache.host_state() == state
    cache.advance_host_state(3)
    assert [s[0] for s in cache.host_state()] == [43, 43]
    assert all(layer.min_filled == 43 for layer in cache.layers)  # the full cache fills one slot a step


def test_a_full_cache_out_of_slots_is_refused_before_a_graph_replay(model):
    """A non-evicting cache grows its storage on the host when a step finds no free slot; a CUDA-graph
    replay runs no Python, so `refuse_growth` (called before every capture and replay) raises there
    instead of letting the step write past the slots. Eager steps still grow."""
    (prompt,) = random_prompts([20], seed=16)
    cache = EvictingCache(make_policy("full"), max_new_tokens=3)  # 20 + 3 slots
    tokens, positions = prefill(model, prompt, cache)
    decoder = Decoder(model, cache, tokens, positions)
    for _ in range(3):
        cache.refuse_growth()  # room left
        decoder.step()
    with pytest.raises(RuntimeError, match="layer 0 of this full cache has no free slot.*max_new_tokens"):
        cache.refuse_growth()
    decoder.step()  # eager: the storage grows
    assert cache.layers[0].keys.shape[2] > 23
    cache.refuse_growth()


@needs_cuda
def test_graph_replay_past_the_full_caches_slots_raises(cuda_model):
    (prompt,) = random_prompts([20], seed=16)
    cache = EvictingCache(make_policy("full"), max_new_tokens=4)
    tokens, positions = prefill(cuda_model, prompt.cuda(), cache)
    decoder = Decoder(cuda_model, cache, tokens, positions, graph=True, warmup=2)  # 2 warm-up steps
    decoder.step()  # the third slot of four
    decoder.step()  # the fourth
    with pytest.raises(RuntimeError, match="no free slot"):
        decoder.step()


@pytest.mark.parametrize("fused", [True, False])
def test_static_control_writes_round_robin_and_never_scores(model, fused):
    (prompt,) = random_prompts([60], seed=13)
    cache = EvictingCache(StaticControl(), budget=20, max_new_tokens=5, prefill="streaming", fused=fused)
    tokens, decoder = decoded(model, prompt, cache)  # StaticControl.score raises: it is never called
    layer = cache.layers[0]
    assert layer.all_valid and cache.slots() == 20 and layer.features == {}
    last = 60 + decoder.steps - 1
    assert torch.equal(layer.next_position, torch.tensor([last + 1]))
    # Slot s holds the last token whose position is s mod 20: compare with a plain forward's keys.
    full = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.cat([prompt, tokens[0, :-1]])[None], cache=full)
    expected = full.layers[0].keys[0, :, last - 19 : last + 1]  # positions last-19 .. last
    order = torch.tensor([(p % 20) for p in range(last - 19, last + 1)])
    assert torch.allclose(layer.keys[0][:, order], expected, atol=1e-12)


def test_static_control_refuses_to_score(model):
    (prompt,) = random_prompts([60], seed=13)
    cache = EvictingCache(StaticControl(), budget=20, max_new_tokens=5, prefill="window")
    with pytest.raises(ValueError, match="static control does not score"):
        prefill(model, prompt, cache)


def test_graph_on_cpu_is_refused(model):
    (prompt,) = random_prompts([20])
    cache = EvictingCache(make_policy("lshe"), budget=16, max_new_tokens=4)
    tokens, positions = prefill(model, prompt, cache)
    with pytest.raises(ValueError, match="CUDA"):
        Decoder(model, cache, tokens, positions, graph=True)


@pytest.fixture(scope="module")
def cuda_model():
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    return use_lshe_attention(tiny_llama().float().cuda())


@needs_cuda
@pytest.mark.parametrize("name", ["lshe", "h2o", "random", "full", "static"])
def test_cuda_graph_replay_equals_eager_decoding(cuda_model, name):
    (prompt,) = random_prompts([48], seed=14)
    prompt = prompt.cuda()

    def make():
        if name == "static":
            return EvictingCache(StaticControl(), budget=24, max_new_tokens=NEW, prefill="streaming")
        return EvictingCache(make_policy(name), budget=24, max_new_tokens=NEW)

    eager_cache, graph_cache = make(), make()
    eager, _ = decoded(cuda_model, prompt, eager_cache)
    graphed, decoder = decoded(cuda_model, prompt, graph_cache, graph=True)
    assert decoder.graph is not None
    assert torch.equal(graphed, eager[:, -graphed.shape[1] :]), name
    for a, b in zip(eager_cache.layers, graph_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.valid, b.valid)
        assert torch.equal(a.next_position, b.next_position)
        assert a.seen == b.seen and a.min_filled == b.min_filled


@needs_cuda
@pytest.mark.parametrize("name", ["lshe", "h2o", "random", "full"])
def test_decode_step_makes_no_host_synchronisation(cuda_model, name):
    (prompt,) = random_prompts([48], seed=15)
    cache = EvictingCache(make_policy(name), budget=24, max_new_tokens=NEW)
    tokens, positions = prefill(cuda_model, prompt.cuda(), cache)
    decoder = Decoder(cuda_model, cache, tokens, positions)
    decoder.step()  # first step: lazily created tables may copy from the host
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            decoder.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _generate_both(model, name, ids, mask, eos, new=12, graph=False):
    """(plain generate's new tokens, greedy_generate's) for one padded batch and EOS set."""
    from lshe.fast_decode import greedy_generate

    def cache():
        return EvictingCache(make_policy(name), budget=0.5, max_new_tokens=new)

    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
        pad_token_id=0, cache=cache(),
    )[:, ids.shape[1] :]  # fmt: skip
    device_ids, device_mask = ids.to(model.device), mask.to(model.device)
    got = greedy_generate(model, cache(), device_ids, device_mask, new, eos, 0, graph=graph)
    return expected, got.cpu()


@pytest.mark.parametrize("name", ["lshe", "h2o", "random", "full", "knorm"])
def test_greedy_generate_equals_generate_on_a_padded_batch_with_per_row_stops(model, name):
    """Left padding, rows of different lengths; EOS chosen so that rows stop at different steps (padding
    after their EOS) and, in the second case, all rows stop before max_new_tokens (shorter output)."""
    from conftest import left_pad

    ids, mask = left_pad(random_prompts([30, 45, 38], seed=21))
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          cache=EvictingCache(make_policy(name), budget=0.5, max_new_tokens=12))[:, ids.shape[1]:]  # fmt: skip
    some_rows = [int(free[0, 3])]  # row 0 stops at step 3 (others maybe later or never)
    every_row = [int(free[0, 2]), int(free[1, 5]), int(free[2, 4])]
    for eos in (some_rows, every_row):
        expected, got = _generate_both(model, name, ids, mask, eos)
        assert torch.equal(expected, got), (eos, expected, got)
    assert got.shape[1] <= 6 < 12  # the second case stopped early, as generate did


@needs_cuda
@pytest.mark.parametrize("name", ["lshe", "h2o", "random", "full"])
def test_greedy_generate_with_cuda_graphs_equals_generate(model, name):
    from conftest import left_pad

    cuda_model = model.to("cuda")
    try:
        ids, mask = left_pad(random_prompts([30, 45, 38], seed=22))
        free = cuda_model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=16,
                                   do_sample=False, cache=EvictingCache(make_policy(name), budget=0.5,
                                   max_new_tokens=16))[:, ids.shape[1]:].cpu()  # fmt: skip
        expected, got = _generate_both(
            cuda_model, name, ids.cuda(), mask.cuda(), [int(free[1, 6])], new=16, graph=True
        )
        assert torch.equal(expected.cpu(), got)
    finally:
        model.to("cpu")
