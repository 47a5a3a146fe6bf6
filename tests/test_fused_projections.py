"""One q/k/v product per attention module, and one gate/up product with the SiLU x up per gated MLP
(`lshe.fused_projections`), against the model's own ``nn.Linear`` projections and forwards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import random_prompts, tiny_llama
from lshe.compiled import decoder_layers
from lshe.fused_projections import (
    GATE_UP,
    QKV,
    FusedProjections,
    GatedMLP,
    ProjectionPart,
    fusable,
    gated_mlp,
)


def attention_modules(model):
    return [layer.self_attn for layer in decoder_layers(model)]


def test_linear_weights_become_slices_of_one_stack_and_eager_output_is_unchanged():
    model = tiny_llama(seed=7)
    reference = copy.deepcopy(model)
    (prompt,) = random_prompts([20], seed=3)
    fused = FusedProjections(decoder_layers(model))
    assert len(fused.entries) == 2
    for module, _, _, parts in fused.entries:
        stack = parts[0].stacked.weight
        assert stack.shape == (64 + 32 + 32, 64)
        for name in QKV:  # one copy in memory: each weight lies in the stack's storage
            own = getattr(module, name).weight
            assert own.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
    with torch.no_grad():  # outside `active`, the model computes as before, bit for bit
        assert torch.equal(model(prompt[None]).logits, reference(prompt[None]).logits)


def test_one_product_per_hidden_state_gives_each_projection(monkeypatch):
    """Inside `active`: one F.linear over the stack per attention call (none with a q/k/v weight), and
    every layer's output equals the unfused model's (float64, so sum-order differences vanish)."""
    model = tiny_llama(seed=8)
    reference = copy.deepcopy(model)
    fused = FusedProjections(decoder_layers(model))
    stacks = {parts[0].stacked.weight.data_ptr() for _, _, _, parts in fused.entries}
    qkv = {getattr(m, n).weight.data_ptr() for m in attention_modules(reference) for n in QKV}
    seen = []
    real = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        seen.append(weight.data_ptr())
        return real(x, weight, bias)

    (prompt,) = random_prompts([24], seed=4)
    with torch.no_grad():
        expected = reference(prompt[None], output_hidden_states=True).hidden_states
        monkeypatch.setattr(torch.nn.functional, "linear", recording)
        with fused.active():
            assert all(isinstance(m.q_proj, ProjectionPart) for m in attention_modules(model))
            got = model(prompt[None], output_hidden_states=True).hidden_states
    assert sum(ptr in stacks for ptr in seen) == 2 and not qkv & set(seen)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(type(m.q_proj) is nn.Linear for m in attention_modules(model))  # restored after


def test_a_projection_of_another_input_is_computed_afresh():
    model = tiny_llama(seed=9)
    fused = FusedProjections(decoder_layers(model))
    module, _, linears, parts = fused.entries[0]
    x, y = torch.randn(1, 3, 64, dtype=torch.float64), torch.randn(1, 3, 64, dtype=torch.float64)
    with fused.active():
        q = module.q_proj(x)
        k = module.k_proj(y)  # another hidden state: not the slice of x's product
        v = module.v_proj(y)
    torch.testing.assert_close(q, x @ linears[0].weight.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, y @ linears[1].weight.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, y @ linears[2].weight.T, rtol=1e-12, atol=1e-12)
    assert parts[0].stacked.input is None  # every part served: no tensor held


def test_stack_is_rebuilt_when_the_model_is_converted_after_fusing():
    """``model.float()`` after fusing replaces the weights: the stale stack must not be used."""
    model = tiny_llama(seed=10)
    fused = FusedProjections(decoder_layers(model))
    model.float()
    reference = copy.deepcopy(model)
    (prompt,) = random_prompts([16], seed=5)
    with torch.no_grad(), fused.active():
        got = model(prompt[None]).logits
    assert all(parts[0].stacked.weight.dtype == torch.float32 for _, _, _, parts in fused.entries)
    with torch.no_grad():
        torch.testing.assert_close(got, reference(prompt[None]).logits, rtol=1e-5, atol=1e-5)


def test_projections_are_restored_when_the_block_raises():
    model = tiny_llama(seed=11)
    fused = FusedProjections(decoder_layers(model))
    with pytest.raises(RuntimeError, match="inside"), fused.active():
        raise RuntimeError("inside")
    assert all(type(m.k_proj) is nn.Linear for m in attention_modules(model))


def test_modules_without_three_plain_linears_are_left_alone():
    class Fused(nn.Module):  # e.g. Phi3's one qkv_proj
        def __init__(self):
            super().__init__()
            self.qkv_proj = nn.Linear(8, 24)

    class Mixed(nn.Module):  # unequal input sizes
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(6, 4)

    assert not fusable(Fused()) and not fusable(Mixed())
    assert FusedProjections([Fused(), Mixed()]).entries == []


def test_stack_built_in_inference_mode_still_takes_a_state_dict():
    """`greedy_generate(compile=True)` may build the stack inside inference mode: the weights must stay
    normal tensors, so that loading other weights afterwards works and reaches the stacked product."""
    model = tiny_llama(seed=12)
    other = tiny_llama(seed=13)
    with torch.inference_mode():
        fused = FusedProjections(decoder_layers(model))
    assert not any(p.is_inference() for p in model.parameters())
    model.load_state_dict(other.state_dict())
    (prompt,) = random_prompts([16], seed=6)
    with torch.no_grad(), fused.active():
        got = model(prompt[None]).logits
    with torch.no_grad():
        torch.testing.assert_close(got, other(prompt[None]).logits, rtol=1e-12, atol=1e-12)


def test_offloaded_projections_are_left_alone():
    module = nn.Module()
    module.q_proj, module.k_proj, module.v_proj = (nn.Linear(8, 8, device="meta") for _ in range(3))
    assert not fusable(module)


def test_hooked_or_replaced_projections_keep_their_own_path():
    """A hook on a projection (registered before or after fusing) must run, and a projection replaced
    after fusing (e.g. by an adapter) must be used and stay in place: such modules are not fused."""
    model = tiny_llama(seed=14)
    reference = copy.deepcopy(model)
    fused = FusedProjections(decoder_layers(model))
    attention, ref_attention = attention_modules(model), attention_modules(reference)

    def zero(module, args, output):
        return torch.zeros_like(output)

    attention[1].v_proj.register_forward_hook(zero)
    ref_attention[1].v_proj.register_forward_hook(zero)
    replacement = nn.Linear(64, 32, bias=False).double()
    attention[0].k_proj = replacement
    ref_attention[0].k_proj = copy.deepcopy(replacement)
    (prompt,) = random_prompts([16], seed=7)
    with torch.no_grad():
        with fused.active():
            assert [type(m.q_proj) for m in attention] == [nn.Linear, nn.Linear]
            got = model(prompt[None]).logits
        torch.testing.assert_close(got, reference(prompt[None]).logits, rtol=1e-12, atol=1e-12)
    assert attention[0].k_proj is replacement
    again = FusedProjections(decoder_layers(model)).entries  # a fresh fusing takes the plain replacement
    assert [module for module, _, _, _ in again] == [attention[0]]  # and not the hooked layer


def test_a_failed_restack_leaves_the_model_as_it_was(monkeypatch):
    """Stacks rebuilt inside `active` (after model.float()) may run out of memory: every module swapped
    in before the failure is restored."""
    from lshe import fused_projections

    model = tiny_llama(seed=12)
    fused = FusedProjections(decoder_layers(model))
    model.float()  # every stack is stale now
    real, calls = fused_projections.StackedProjection.stack, []

    def failing(self):
        calls.append(self)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("no room for the second stack")
        real(self)

    monkeypatch.setattr(fused_projections.StackedProjection, "stack", failing)
    with pytest.raises(torch.OutOfMemoryError):
        with fused.active():
            pass
    assert all(type(m.q_proj) is nn.Linear for m in attention_modules(model))


def test_a_projection_whose_forward_was_wrapped_on_the_instance_keeps_it():
    """accelerate's add_hook_to_module sets ``forward`` on the instance, which no torch hook list shows:
    such a projection is hooked too, and keeps its own path."""
    model = tiny_llama(seed=13)
    fused = FusedProjections(decoder_layers(model))
    attention = attention_modules(model)
    original = attention[0].k_proj.forward
    attention[0].k_proj.forward = lambda x: original(x) * 0
    with fused.active():
        assert type(attention[0].q_proj) is nn.Linear and type(attention[1].q_proj) is ProjectionPart


def gated_stand_ins(model, calls=None):
    """FusedProjections of model's layers as `CompiledLayers(products="gemv")` makes them, with
    F.linear and the gated op's eager fallback (CPU tensors) as the products; each gated call's input
    shape appended to ``calls``."""
    from lshe import one_row_products

    def gated(x, weight, bias):
        if calls is not None:
            calls.append(tuple(x.shape))
        return one_row_products.silu_gate_up(x, weight, bias)

    return FusedProjections(decoder_layers(model), (QKV, GATE_UP), F.linear, gated)


def test_gated_mlps_are_recognised_by_their_forward_bytecode_and_a_silu():
    from transformers.activations import ACT2FN
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    llama_mlp = tiny_llama(seed=3).model.layers[0].mlp
    config = tiny_llama(seed=3).config
    assert gated_mlp(llama_mlp)

    class ActOnUp(type(llama_mlp)):  # the same children, another forward
        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    act_on_up = ActOnUp(config)
    gelu = copy.deepcopy(llama_mlp)
    gelu.act_fn = ACT2FN["gelu_pytorch_tanh"]
    hooked = copy.deepcopy(llama_mlp)
    hooked.act_fn.register_forward_hook(lambda module, args, out: out * 2)
    named_silu = copy.deepcopy(llama_mlp)

    class SiLU(nn.GELU):  # the name, not the function
        pass

    named_silu.act_fn = SiLU()
    gemma = Gemma2MLP(config.__class__(**{**config.to_dict(), "hidden_activation": "gelu_pytorch_tanh"}))
    phi = Phi3MLP(config)
    assert not any(gated_mlp(m) for m in (act_on_up, gelu, hooked, named_silu, gemma, phi))


def test_a_gated_mlp_stand_in_equals_the_mlp():
    """Inside `active` each layer's MLP is a GatedMLP (one row: the gated product; several: the stacked
    product and the MLP's SiLU x up), restored after; the model's output equals the unfused model's in
    float64."""
    model = tiny_llama(seed=21)
    reference = copy.deepcopy(model)
    calls = []
    fused = gated_stand_ins(model, calls)
    mlps = [layer.mlp for layer in decoder_layers(model)]
    (prompt,) = random_prompts([18], seed=4)
    for ids in (prompt[None], prompt[None, :1]):
        with torch.no_grad():
            with fused.active():
                assert [type(layer.mlp) for layer in decoder_layers(model)] == [GatedMLP, GatedMLP]
                got = model(ids).logits
            torch.testing.assert_close(got, reference(ids).logits, rtol=1e-12, atol=1e-12)
    assert calls == [(1, 1, 64)] * 2  # the one-row input, in each layer
    assert [layer.mlp for layer in decoder_layers(model)] == mlps


def test_an_mlp_changed_after_fusing_keeps_its_own_forward():
    """An activation replaced, or a hook added to the MLP's down projection, after the stand-ins were
    made: that MLP runs its own forward (and its down projection its own path)."""
    from transformers.activations import ACT2FN

    model = tiny_llama(seed=22)
    reference = copy.deepcopy(model)
    fused = gated_stand_ins(model)
    for m in (model, reference):
        m.model.layers[0].mlp.act_fn = ACT2FN["gelu_pytorch_tanh"]
        m.model.layers[1].mlp.down_proj.register_forward_hook(lambda module, args, out: out * 3)
    (prompt,) = random_prompts([12], seed=5)
    with torch.no_grad():
        with fused.active():
            assert [type(layer.mlp) for layer in decoder_layers(model)] == [
                type(reference.model.layers[0].mlp)
            ] * 2
            got = model(prompt[None]).logits
        torch.testing.assert_close(got, reference(prompt[None]).logits, rtol=1e-12, atol=1e-12)


def test_a_gated_product_needs_a_product_for_down():
    with pytest.raises(ValueError, match="a gated product needs a product"):
        FusedProjections(decoder_layers(tiny_llama(seed=1)), (QKV, GATE_UP), None, F.linear)


def test_an_mlp_class_patched_after_fusing_runs_the_patch(monkeypatch):
    model = tiny_llama(seed=23)
    fused = gated_stand_ins(model)
    mlp_class = type(model.model.layers[0].mlp)

    def act_on_up(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    monkeypatch.setattr(mlp_class, "forward", act_on_up)
    reference = copy.deepcopy(model)
    (prompt,) = random_prompts([10], seed=6)
    with torch.no_grad():
        with fused.active():
            assert [type(layer.mlp) for layer in decoder_layers(model)] == [mlp_class] * 2
            got = model(prompt[None, :1]).logits
        torch.testing.assert_close(got, reference(prompt[None, :1]).logits, rtol=1e-12, atol=1e-12)


def test_nothing_is_swapped_while_global_module_hooks_are_registered():
    """A hook for every module call (``register_module_forward_hook``) would not see the modules that
    stand-ins replace, nor see them by their classes."""
    model = tiny_llama(seed=24)
    fused = gated_stand_ins(model)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m)))
    try:
        with torch.no_grad(), fused.active():
            model(random_prompts([6], seed=7)[0][None, :1])
    finally:
        handle.remove()
    assert not any(t in (GatedMLP, ProjectionPart) for t in seen)
    mlp = model.model.layers[0].mlp
    assert type(mlp) in seen and type(mlp.act_fn) in seen  # the modules themselves ran
    with fused.active():  # the hook removed: swapped again
        assert type(model.model.layers[0].mlp) is GatedMLP


def test_a_module_shared_by_two_layers_is_stacked_once():
    model = tiny_llama(seed=25)
    layers = decoder_layers(model)
    layers[1].mlp, layers[1].self_attn = layers[0].mlp, layers[0].self_attn
    fused = gated_stand_ins(model)
    stand_ins = [type(parts[0]).__name__ for _, _, _, parts in fused.entries]
    assert sorted(stand_ins) == ["GatedMLP", "OwnProduct", "ProjectionPart"]  # o_proj; q/k/v; the MLP
