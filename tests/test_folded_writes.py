"""The decode step's writes folded into the Triton attention launch (`lshe.kernels.SlotWrite`) leave
the cache exactly as the separate writes do (`lshe.kernels.write_kv`, the validity scatter, the
position and free-slot advances), and the attention output equal up to float rounding: the new
token's logit is a sum in another order than the tile's product (as are H2O's and TOVA's statistics).

On a GPU these run on CUDA tensors; without one they run on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` and triton imports (the attention kernel's CUDA check is lifted there), else
they are skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lshe import attention_stats, kernels, victim_kernel
from lshe.cache import EvictingCache
from lshe.layer import EvictingLayer
from policies import make_policy
from policies.static import StaticControl

ON_GPU = kernels.available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (ON_GPU or victim_kernel.interpreted()),
    reason="the attention kernel needs triton and a CUDA GPU, or TRITON_INTERPRET=1 with triton installed",
)


@pytest.fixture(autouse=True)
def _cpu_interpreter(monkeypatch):
    """Under the interpreter the kernels take CPU tensors: `attention_applies` without its CUDA check."""
    if not ON_GPU:

        def applies(query, keys):
            dim = keys.shape[-1]
            return query.shape[2] == 1 and dim >= 16 and dim & (dim - 1) == 0 and keys.is_contiguous()

        monkeypatch.setattr(kernels, "attention_applies", applies)


DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots", [5, kernels.ONE_SPLIT_SLOTS, kernels.ONE_SPLIT_SLOTS + 1, 700])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["victim", "row_slot", "free_slot"])
@pytest.mark.parametrize("one_wave", [True, False])
def test_folded_writes_equal_write_kv_then_attention(dtype, slots, masked, kind, one_wave, monkeypatch):
    """kind: a victim per (row, KV head) already marked valid (LSH-E, the victim kernel); one slot per
    row expanded over the heads (the static control); a non-evicting layer's free slot, marked valid
    and advanced. Compared with `write_kv`, the torch validity scatter and a plain attention launch.
    Beyond one wave of the writing kernel (``one_wave`` False) the writes are launches of their own."""
    monkeypatch.setattr(kernels, "folds_in_one_wave", lambda rows, splits, device: one_wave)
    generator = torch.Generator(device=DEVICE).manual_seed(slots + masked)
    batch, heads, group, dim = 2, 3, 4, 64

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE).to(dtype)

    query, keys, values = (
        randn(batch, heads * group, 1, dim),
        randn(batch, heads, slots, dim),
        randn(batch, heads, slots, dim),
    )
    key = randn(batch, 1, heads, dim).transpose(1, 2)  # as a model hands it: not contiguous
    value = randn(batch, 1, heads, dim).transpose(1, 2)
    if kind == "row_slot":
        slot = torch.randint(0, slots, (batch, 1, 1), generator=generator, device=DEVICE).expand(
            batch, heads, 1
        )
    else:
        slot = torch.randint(0, slots, (batch, heads, 1), generator=generator, device=DEVICE)
    valid = (torch.rand(batch, heads, slots, generator=generator, device=DEVICE) > 0.3) if masked else None
    position = torch.tensor([7, 300], device=DEVICE)

    expected_keys, expected_values = keys.clone(), values.clone()
    kernels.write_kv(expected_keys, expected_values, slot, key, value)
    expected_valid = None if valid is None else valid.clone().scatter_(2, slot, True)
    expected = kernels.decode_attention(query, expected_keys, expected_values, expected_valid, dim**-0.5)

    if kind != "free_slot" and valid is not None:
        valid = expected_valid.clone()  # the policy's step marked it
    slot_in = slot.clone() if kind == "free_slot" else slot
    write = kernels.SlotWrite(
        slot_in,
        key,
        value,
        mark_valid=valid if kind == "free_slot" and valid is not None else None,
        next_position=position,
        advance_slot=kind == "free_slot",
    )
    out = kernels.decode_attention(query, keys, values, valid, dim**-0.5, write=write)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    if valid is not None:
        assert torch.equal(valid, expected_valid)
    assert position.tolist() == [8, 301]
    assert torch.equal(slot_in, slot + 1 if kind == "free_slot" else slot)
    assert_as_accurate(out, expected)


def assert_as_accurate(out: torch.Tensor, separate: torch.Tensor) -> None:
    """float32: equal up to float rounding. bfloat16: the same error bound as the attention's own
    (`tests/test_kernels.py`, against float64): the probability of the new token is rounded to
    bfloat16 at another running maximum than in the separate launch, so the last bits differ."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, separate)
    else:
        error = (out.double() - separate.double()).norm() / separate.double().norm()
        assert error < 1e-2, float(error)


@pytest.mark.parametrize("one_wave", [True, False])
def test_write_that_does_not_fit_is_refused(one_wave, monkeypatch):
    """Folded or not (beyond one wave the writes are launches of their own): nothing is written."""
    monkeypatch.setattr(kernels, "folds_in_one_wave", lambda rows, splits, device: one_wave)
    keys = torch.zeros(1, 2, 8, 16, device=DEVICE)
    query = torch.zeros(1, 4, 1, 16, device=DEVICE)
    new = torch.ones(1, 2, 1, 16, device=DEVICE)
    slot = torch.zeros(1, 2, 1, dtype=torch.int64, device=DEVICE)
    for write in (
        kernels.SlotWrite(slot.int(), new, new),  # int32 slots
        kernels.SlotWrite(slot, new.half(), new),  # another dtype than the storage
        kernels.SlotWrite(slot[:, :1].expand(1, 2, 1), new, new, advance_slot=True),  # shared counter
    ):
        assert not write.fits(keys, keys)
        values = keys.clone()
        with pytest.raises(ValueError, match="SlotWrite does not fit"):
            kernels.decode_attention(query, keys, values, None, 0.25, write=write)
        assert not keys.any() and not values.any()


def prefilled(policy, slots: int, prompt: int) -> tuple[EvictingCache, list]:
    """A one-layer cache after its prompt, and the inputs of 12 decode steps."""
    generator = torch.Generator(device=DEVICE).manual_seed(slots + prompt)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    batch, heads, group, dim = 2, 2, 4, 64

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE).to(dtype)

    cache = EvictingCache(policy, budget=slots, sink=2, recent=3, prefill="streaming")
    cache.update(randn(batch, heads, prompt, dim), randn(batch, heads, prompt, dim), 0)
    cache.layers[0].attend(randn(batch, heads * group, prompt, dim), None, dim**-0.5)
    steps = [
        (randn(batch, heads * group, 1, dim), randn(batch, 1, heads, dim).transpose(1, 2), randn(batch, 1, heads, dim).transpose(1, 2))
        for _ in range(12)
    ]  # fmt: skip
    return cache, steps


def decode(cache: EvictingCache, steps: list, fold: bool, monkeypatch):
    """Outputs of the decode steps and the layer's state after them, folding the writes or not."""
    folded = []
    real = EvictingLayer.folds

    def folds(self, *args):
        folds_here = real(self, *args) and fold
        folded.append(folds_here)
        return folds_here

    with monkeypatch.context() as patch:
        patch.setattr(EvictingLayer, "folds", folds)
        outs = []
        for query, key, value in steps:
            cache.update(key, value, 0)
            outs.append(cache.layers[0].attend(query, None, query.shape[-1] ** -0.5))
    layer = cache.layers[0]
    state = {"keys": layer.keys, "values": layer.values, "valid": layer.valid, "recent": layer.recent_slots,
             "position": layer.next_position, **layer.features}  # fmt: skip
    if layer.free_slot is not None:
        state["free_slot"] = layer.free_slot
    return torch.cat(outs, dim=1), state, folded


@pytest.mark.parametrize("name", ["full", "static", "lshe", "streaming", "random", "knorm", "h2o", "tova"])
@pytest.mark.parametrize(("slots", "prompt"), [(20, 20), (20, 12), (150, 150), (150, 100)])
@pytest.mark.parametrize("one_wave", [True, False])
def test_layer_folds_its_writes_with_the_same_outputs_and_state(name, slots, prompt, one_wave, monkeypatch):
    """Every policy, empty slots left or not, one split or several: folding changes the number of
    launches and the output's last bits, nothing else (and it does fold: every step)."""
    if name == "static" and prompt < slots:
        pytest.skip("the static control is measured on full caches only")
    if name == "full" and prompt < slots:
        pytest.skip("the full cache has no budget")

    def policy():
        return StaticControl() if name == "static" else make_policy(name)

    if name in ("h2o", "tova") and not attention_stats.applies(
        torch.zeros(1, 1, 1, 64, device=DEVICE), torch.zeros(1, 1, 2, 64, device=DEVICE)
    ):
        pytest.skip("attention statistics kernel unavailable")
    monkeypatch.setattr(kernels, "folds_in_one_wave", lambda rows, splits, device: one_wave)
    cache, steps = prefilled(policy(), slots, prompt)
    twin = copy.deepcopy(cache)  # the same start: H2O's prompt statistics add atomically (last bits vary)
    out, state, folded = decode(cache, steps, True, monkeypatch)
    reference_out, reference_state, not_folded = decode(twin, steps, False, monkeypatch)
    assert all(folded) and not any(not_folded)
    assert state.keys() == reference_state.keys()
    for key, value in state.items():  # the same victims, the same writes
        if key in ("acc", "last"):  # H2O's and TOVA's attention statistics: float rounding
            torch.testing.assert_close(value, reference_state[key], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(value, reference_state[key]), key
    assert_as_accurate(out, reference_out)
