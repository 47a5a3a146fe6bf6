"""The fused Triton LSH-E step chooses the torch path's victims and leaves the same cache state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lshe import kernels
from lshe.cache import EvictingCache
from policies.lshe import LSHEPolicy

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="the fused kernel needs triton and a CUDA GPU (CPU runs the torch path)"
)


def draw(shape, projection, generator, dtype, margin: float = 1e-3) -> torch.Tensor:
    """Random vectors none of whose projections lies within ``margin`` of 0 (those are redrawn).

    There the kernel's float32 sums (another order than torch's matmul) could set a sign bit
    differently: rounding, not a wrong victim. Projections are ~N(0, head_dim), so few are redrawn.
    """
    x = torch.randn(shape, generator=generator, device="cuda").to(dtype)
    for _ in range(100):
        near = ((x.float() @ projection).abs() <= margin).any(-1)
        if not near.any():
            return x
        fresh = torch.randn(int(near.sum()), shape[-1], generator=generator, device="cuda")
        x[near] = fresh.to(dtype)
    raise AssertionError("could not draw vectors clear of the sign boundary")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("group", "proj_dim", "probe", "slots", "prompt"),
    [
        (4, 16, "query", 96, 96),  # full cache: every step evicts
        (4, 16, "key", 96, 96),
        (1, 8, "query", 70, 70),
        (3, 24, "query", 300, 300),
        (2, 32, "query", 4100, 4100),  # several blocks of the scan, 32-bit codes
        (4, 16, "query", 96, 80),  # empty slots are taken first
    ],
)
def test_fused_step_equals_torch_path(dtype, group, proj_dim, probe, slots, prompt):
    batch, heads, dim, sink, recent = 3, 2, 64, 4, 10
    generator = torch.Generator(device="cuda").manual_seed(slots + proj_dim + group)
    caches = []
    for fused in (True, False):
        policy = LSHEPolicy(proj_dim=proj_dim, probe=probe, seed=1)
        cache = EvictingCache(
            policy, budget=slots, sink=sink, recent=recent, prefill="streaming", fused=fused
        )
        caches.append(cache)
    projection = caches[0].policy.projection(0, dim, torch.device("cuda"))
    keys = draw((batch, heads, prompt, dim), projection, generator, dtype)
    values = torch.randn(keys.shape, generator=generator, device="cuda").to(dtype)
    query = torch.randn(batch, heads * group, prompt, dim, generator=generator, device="cuda").to(dtype)
    for cache in caches:
        cache.update(keys, values, 0)
        cache.layers[0].attend(query, None, 1.0)
    calls = {"n": 0}
    real = kernels.lshe_step

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    kernels.lshe_step = counting
    try:
        for step in range(25):
            q = draw((batch, heads * group, 1, dim), projection, generator, dtype)
            k = draw((batch, heads, 1, dim), projection, generator, dtype)
            v = torch.randn(k.shape, generator=generator, device="cuda").to(dtype)
            for cache in caches:
                cache.update(k, v, 0)
                cache.layers[0].attend(q, None, 1.0)
            fused, reference = caches[0].layers[0], caches[1].layers[0]
            assert torch.equal(fused.keys, reference.keys), step  # the same victims were overwritten
            assert torch.equal(fused.values, reference.values), step
            assert torch.equal(fused.valid, reference.valid), step
            assert torch.equal(fused.features["codes"], reference.features["codes"]), step
            assert torch.equal(fused.recent_slots, reference.recent_slots), step
    finally:
        kernels.lshe_step = real
    assert calls["n"] == 25  # the fused cache really took the kernel, the other the torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "heads", "slots", "dim"), [(1, 8, 300, 128), (3, 2, 17, 80), (2, 3, 5, 16)]
)
def test_write_kv_equals_two_scatters(dtype, batch, heads, slots, dim):
    """The one-launch key and value write leaves the storage exactly as the torch path's two scatters,
    for the new key and value as a model hands them (a transposed projection, not contiguous) and a
    head size that is no power of two."""
    generator = torch.Generator(device="cuda").manual_seed(slots)
    keys = torch.randn(batch, heads, slots, dim, generator=generator, device="cuda").to(dtype)
    values = torch.randn(keys.shape, generator=generator, device="cuda").to(dtype)
    key = torch.randn(batch, 1, heads, dim, generator=generator, device="cuda").to(dtype).transpose(1, 2)
    value = torch.randn(batch, 1, heads, dim, generator=generator, device="cuda").to(dtype).transpose(1, 2)
    slot = torch.randint(0, slots, (batch, heads, 1), generator=generator, device="cuda")
    index = slot[..., None].expand(-1, -1, -1, dim)
    expected_keys = keys.clone().scatter_(2, index, key)
    expected_values = values.clone().scatter_(2, index, value)
    assert kernels.kv_write_applies(keys, values, slot, key, value)
    kernels.write_kv(keys, values, slot, key, value)
    assert torch.equal(keys, expected_keys)
    assert torch.equal(values, expected_values)
    # one slot for every head of a row, as the static control passes it (an expanded, stride-0 view)
    shared = slot[:, :1].expand(-1, heads, 1)
    expected_keys.scatter_(2, shared[..., None].expand(-1, -1, -1, dim), key)
    expected_values.scatter_(2, shared[..., None].expand(-1, -1, -1, dim), value)
    kernels.write_kv(keys, values, shared, key, value)
    assert torch.equal(keys, expected_keys)
    assert torch.equal(values, expected_values)
    other = torch.float16 if dtype == torch.float32 else torch.float32
    assert not kernels.kv_write_applies(keys, values, slot, key.to(other), value)  # scatter_ raises there
    assert not kernels.kv_write_applies(keys, values, slot.int(), key, value)
    assert not kernels.kv_write_applies(keys, values, slot[:, :1], key, value)
    assert not kernels.kv_write_applies(keys.cpu(), values.cpu(), slot.cpu(), key.cpu(), value.cpu())


def test_write_kv_fails_loudly_on_a_slot_out_of_range():
    """A slot outside [0, slots) (a user's `fused_step` may return one) stops the process with a device
    assert, as the torch path's scatter does, instead of writing past the storage. In a subprocess: a
    device assert leaves the CUDA context unusable."""
    code = (
        "import torch; from lshe import kernels; k = torch.zeros(1, 2, 5, 16, device='cuda'); "
        "n = torch.ones(1, 2, 1, 16, device='cuda'); slot = torch.tensor([1, 5], device='cuda').reshape(1, 2, 1); "
        "kernels.write_kv(k, k.clone(), slot, n, n); torch.cuda.synchronize()"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "assert" in result.stderr.lower(), result.stderr[-2000:]


def test_kernel_does_not_apply_where_it_cannot_match():
    query = torch.zeros(1, 2, 1, 8, device="cuda")

    class Subclass(LSHEPolicy):
        pass

    assert LSHEPolicy(proj_dim=16).fuses(query)
    assert not LSHEPolicy(proj_dim=64).fuses(query)  # codes wider than 32 bits
    assert not LSHEPolicy(proj_dim=16, score_decay=0.5).fuses(query)  # accumulated scores
    assert not LSHEPolicy(proj_dim=16).fuses(query.cpu())
    assert not Subclass(proj_dim=16).fuses(query)  # may change what the kernel hard-codes
    assert LSHEPolicy(proj_dim=64).fused_step(None, query, query) is None  # nothing touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "heads", "group", "slots", "dim", "masked"),
    [
        (1, 8, 4, 9831, 128, False),
        (3, 2, 4, 1000, 64, True),
        (2, 3, 3, 129, 16, True),
        (5, 1, 1, 64, 32, False),
        (1, 8, 4, kernels.ONE_SPLIT_SLOTS, 128, True),  # one split, written without the merge
        (1, 8, 4, kernels.ONE_SPLIT_SLOTS + 1, 128, False),  # split and merged
    ],
)
def test_decode_attention_equals_sdpa(dtype, batch, heads, group, slots, dim, masked):
    generator = torch.Generator(device="cuda").manual_seed(slots)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    query, keys, values = (
        randn(batch, heads * group, 1, dim),
        randn(batch, heads, slots, dim),
        randn(batch, heads, slots, dim),
    )
    valid = None
    if masked:
        valid = torch.rand(batch, heads, slots, generator=generator, device="cuda") > 0.3
        valid[..., 0] = True
    out = kernels.decode_attention(query, keys, values, valid, dim**-0.5)
    q = query.double().reshape(batch, heads, group, dim)
    mask = None if valid is None else valid[:, :, None, :]
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, keys.double(), values.double(), attn_mask=mask, scale=dim**-0.5
    ).reshape(batch, heads * group, 1, dim)
    error = (out.double() - reference).norm() / reference.norm()
    assert out.dtype == dtype and out.shape == query.shape
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), float(error)


def test_short_cache_attention_skips_the_merge_launch(monkeypatch):
    """Up to ONE_SPLIT_SLOTS slots (no sinks) the split kernel writes the output; beyond, or with
    sinks, the merge kernel runs."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            launches.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kernels, "_attention_merge_kernel", Recorder())
    for slots, sinks, merged in ((kernels.ONE_SPLIT_SLOTS, None, False), (kernels.ONE_SPLIT_SLOTS + 1, None, True),
                                 (16, torch.zeros(8, device="cuda"), True)):  # fmt: skip
        launches.clear()
        keys = torch.randn(1, 2, slots, 64, device="cuda")
        kernels.decode_attention(
            torch.randn(1, 8, 1, 64, device="cuda"), keys, keys, None, 0.125, sinks=sinks
        )
        assert bool(launches) == merged, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "heads", "group", "slots", "dim", "masked", "softcap"),
    [
        (1, 8, 4, 9831, 128, False, 50.0),  # Gemma2's cap, many splits
        (3, 2, 4, 1000, 64, True, 1.0),  # a cap that flattens most logits
        (2, 3, 3, 129, 16, True, 5.0),
    ],
)
def test_decode_attention_softcap_equals_float64_reference(
    dtype, batch, heads, group, slots, dim, masked, softcap
):
    generator = torch.Generator(device="cuda").manual_seed(slots + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    query = randn(batch, heads * group, 1, dim) * 3  # large logits, so that the cap matters
    keys, values = randn(batch, heads, slots, dim), randn(batch, heads, slots, dim)
    valid = None
    if masked:
        valid = torch.rand(batch, heads, slots, generator=generator, device="cuda") > 0.3
        valid[..., 0] = True
    scale = dim**-0.5
    out = kernels.decode_attention(query, keys, values, valid, scale, softcap=softcap)
    q = query.double().reshape(batch, heads, group, dim)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.double()) * scale
    capped = softcap * torch.tanh(logits / softcap)
    if valid is not None:
        capped = capped.masked_fill(~valid[:, :, None, :], float("-inf"))
    reference = torch.einsum("bhgs,bhsd->bhgd", capped.softmax(-1), values.double())
    reference = reference.reshape(batch, heads * group, 1, dim)
    error = (out.double() - reference).norm() / reference.norm()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), float(error)
    if dtype == torch.float32:  # the cap was applied: without it the output is much further off
        uncapped = kernels.decode_attention(query, keys, values, valid, scale)
        assert (uncapped.double() - reference).norm() / reference.norm() > 10 * error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "heads", "group", "slots", "dim", "masked", "softcap"),
    [
        (1, 8, 8, 4100, 64, False, None),  # gpt-oss's grouping, several splits
        (3, 2, 4, 1000, 64, True, None),
        (2, 3, 3, 129, 16, True, 5.0),  # with a soft-cap too
    ],
)
def test_decode_attention_sinks_equal_float64_reference(
    dtype, batch, heads, group, slots, dim, masked, softcap
):
    generator = torch.Generator(device="cuda").manual_seed(slots + 2)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    query, keys, values = (
        randn(batch, heads * group, 1, dim),
        randn(batch, heads, slots, dim),
        randn(batch, heads, slots, dim),
    )
    sinks = 3 * randn(heads * group).float() + 4  # large enough to take a visible share
    valid = None
    if masked:
        valid = torch.rand(batch, heads, slots, generator=generator, device="cuda") > 0.3
        valid[..., 0] = True
    scale = dim**-0.5
    out = kernels.decode_attention(query, keys, values, valid, scale, softcap=softcap, sinks=sinks)
    q = query.double().reshape(batch, heads, group, dim)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.double()) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    sink = sinks.double().reshape(1, heads, group, 1).expand(batch, -1, -1, 1)
    weights = torch.cat([logits, sink], dim=-1).softmax(-1)[..., :-1]  # the sink has no value
    reference = torch.einsum("bhgs,bhsd->bhgd", weights, values.double()).reshape(
        batch, heads * group, 1, dim
    )
    error = (out.double() - reference).norm() / reference.norm()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), float(error)
    if dtype == torch.float32:  # the sinks were applied: without them the output is much further off
        plain = kernels.decode_attention(query, keys, values, valid, scale, softcap=softcap)
        assert (plain.double() - reference).norm() / reference.norm() > 10 * error
