"""The one-row GEMV (`lshe.one_row_products`) against a float64 product and ``F.linear``, and the
compiled layers with ``products="gemv"`` against the eager step.

The kernel's tests run on a GPU, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
with triton installed), else they are skipped. The interpreter converts float32 to bfloat16 by
truncation, a GPU to the nearest: both are within one unit in the last place of the output."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import random_prompts, tiny_llama
from lshe import one_row_products
from lshe.attention import use_lshe_attention
from lshe.cache import EvictingCache
from lshe.compiled import CompiledLayers, decoder_layers
from lshe.fused_projections import GatedMLP, OwnProduct, ProjectionPart
from policies import make_policy

ON_GPU = one_row_products.triton is not None and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
kernel_runs = pytest.mark.skipif(
    not (ON_GPU or one_row_products.interpreted()),
    reason="the GEMV needs triton and a CUDA GPU, or TRITON_INTERPRET=1 with triton installed",
)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of x (float64)."""
    info = torch.finfo(x.dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(x.double().abs().clamp_min(info.tiny))))


@kernel_runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n", "k", "bias"), [(64, 1024, False), (48, 700, True), (1, 512, True), (1000, 1536, False)]
)
def test_gemv_equals_the_float64_product_within_one_rounding(dtype, n, k, bias):
    generator = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    x = torch.randn(1, 1, k, generator=generator).to(DEVICE, dtype)
    b = torch.randn(n, generator=generator).to(DEVICE, dtype) if bias else None
    assert one_row_products.applies(x, weight)
    got = torch.ops.lshe.one_row_linear(x, weight, b)
    exact = x.double() @ weight.double().T + (b.double() if bias else 0)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    if dtype == torch.float32:  # the float32 sum itself: only its order differs from cuBLAS's
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)
    else:
        rounded = exact.to(dtype)
        assert ((got.double() - rounded.double()).abs() <= ulp(rounded)).all()


@kernel_runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n", "k", "bias"), [(64, 1024, False), (40, 700, True), (1000, 1536, False), (1, 300, True)]
)
def test_silu_gate_up_equals_the_eager_silu_of_float64_products(dtype, n, k, bias):
    """The gate and up products within one rounding of the float64 ones (as the GEMV's), then the
    eager SiLU x up of them in the dtype: within two units in the last place of the eager result on
    the exactly rounded products (one from the products' rounding, one carried through the SiLU); eight
    under the interpreter, whose four roundings all truncate, and the SiLU of a negative gate multiplies
    its relative error by up to 1 + |gate| (measured: up to 6)."""
    generator = torch.Generator().manual_seed(n + k)
    weight = torch.randn(2 * n, k, generator=generator).to(DEVICE, dtype) / k**0.25
    x = torch.randn(1, k, generator=generator).to(DEVICE, dtype) / k**0.25
    b = torch.randn(2 * n, generator=generator).to(DEVICE, dtype) if bias else None
    got = torch.ops.lshe.one_row_silu_gate_up(x, weight, b)
    gate, up = (x.double() @ weight.double().T + (b.double() if bias else 0)).chunk(2, dim=-1)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
        return
    eager = F.silu(gate.to(dtype)) * up.to(dtype)
    assert got.shape == (1, n) and got.dtype == dtype
    ulps = 8 if one_row_products.interpreted() else 2
    assert ((got.double() - eager.double()).abs() <= ulps * ulp(eager) + 1e-6).all()


def test_silu_gate_up_of_several_rows_or_off_the_gpu_is_the_eager_one_bit_for_bit():
    weight, bias = torch.randn(48, 40), torch.randn(48)
    inputs = [torch.randn(3, 1, 40), torch.randn(2, 5, 40)]
    if not one_row_products.interpreted():
        inputs.append(torch.randn(1, 1, 40))  # a CPU tensor
    for x in inputs:
        gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
        assert torch.equal(torch.ops.lshe.one_row_silu_gate_up(x, weight, bias), F.silu(gate) * up)


def test_products_of_several_rows_or_off_the_gpu_are_f_linear_bit_for_bit():
    weight, bias = torch.randn(24, 40), torch.randn(24)
    for x in (torch.randn(3, 1, 40), torch.randn(2, 5, 40)):
        assert not one_row_products.applies(x, weight)
        assert torch.equal(torch.ops.lshe.one_row_linear(x, weight, bias), F.linear(x, weight, bias))
    if not one_row_products.interpreted():
        x = torch.randn(1, 1, 40)
        assert not one_row_products.applies(x, weight)  # a CPU tensor: F.linear
        assert torch.equal(torch.ops.lshe.one_row_linear(x, weight, bias), F.linear(x, weight, bias))


@pytest.mark.skipif(one_row_products.triton is None, reason="needs triton")
def test_rows_per_program_keep_the_gpu_busy():
    cpu = torch.device("cpu")  # 2 multiprocessors assumed off the GPU: at least 8 programs
    assert [one_row_products.config(n, cpu) for n in (1, 8, 64, 128, 4096)] == [1, 1, 8, 16, 16]


def test_gemv_layers_stand_in_for_every_linear_and_equal_the_eager_step():
    """products="gemv": q/k/v stacked, o through OwnProduct, each MLP a GatedMLP (gate/up stacked with
    the SiLU x up, down through the product), the lm_head untouched; the compiled step (inductor's CPU
    backend, the ops as F.linear off the GPU) equals the eager one."""
    model = use_lshe_attention(tiny_llama(seed=5).float())
    layers = CompiledLayers(model, products="gemv")
    with layers.active():
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            assert [type(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
                ProjectionPart, ProjectionPart, ProjectionPart, OwnProduct]  # fmt: skip
            assert type(mlp) is GatedMLP
        assert type(model.lm_head) is nn.Linear
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in decoder_layers(model))  # restored
    (prompt,) = random_prompts([40], seed=9)
    caches = [EvictingCache(make_policy("lshe"), budget=20, max_new_tokens=8) for _ in range(2)]
    with torch.inference_mode():
        tokens = [model(prompt[None], cache=c, logits_to_keep=1).logits[:, -1:].argmax(-1) for c in caches]
    positions = torch.full((1, 1), 40)
    for _ in range(8):
        with torch.inference_mode():
            eager = model(input_ids=tokens[0], position_ids=positions, cache=caches[0], logits_to_keep=1)
            with layers.active():
                fast = model(input_ids=tokens[1], position_ids=positions, cache=caches[1], logits_to_keep=1)
        torch.testing.assert_close(fast.logits, eager.logits, rtol=1e-4, atol=1e-4)
        tokens = [eager.logits[:, -1:].argmax(-1), fast.logits[:, -1:].argmax(-1)]
        assert torch.equal(tokens[0], tokens[1])
        positions = positions + 1


def test_products_must_be_inductor_or_gemv():
    with pytest.raises(ValueError, match="products must be 'inductor' or 'gemv', got 'cublas'"):
        CompiledLayers(tiny_llama(seed=1), products="cublas")


def test_unfused_projections_are_refused_with_the_gemv_products_that_always_stack_them():
    with pytest.raises(ValueError, match="fuse_qkv=False needs products='inductor'"):
        CompiledLayers(tiny_llama(seed=1), fuse_qkv=False)  # the default products: gemv
    assert CompiledLayers(tiny_llama(seed=1), fuse_qkv=False, products="inductor").fused is None


@kernel_runs
def test_a_bias_the_gemv_cannot_read_as_n_contiguous_values_goes_to_f_linear():
    """F.linear broadcasts a (1,) bias and refuses a bias of another dtype or length; a strided bias is
    read by stride. The GEMV reads N contiguous values: anything else is F.linear's, result or error."""
    weight = torch.randn(48, 700, device=DEVICE)
    x = torch.randn(1, 700, device=DEVICE)
    for bias in (
        torch.randn(96, device=DEVICE)[::2],  # strided
        torch.randn(1, device=DEVICE),  # broadcast
        torch.randn(51, device=DEVICE),  # too long
        torch.randn(48, device=DEVICE, dtype=torch.float64),  # another dtype
    ):
        assert not one_row_products.applies(x, weight, bias)
        try:
            expected = F.linear(x, weight, bias)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                torch.ops.lshe.one_row_linear(x, weight, bias)
        else:
            assert torch.equal(torch.ops.lshe.one_row_linear(x, weight, bias), expected)


def test_one_model_takes_one_products_setting():
    """A second products setting would restack the weights the first one's stacks point at."""
    from lshe.compiled import compiled_layers

    model = tiny_llama(seed=6)
    assert compiled_layers(model, "gemv") is compiled_layers(model, "gemv")
    with pytest.raises(ValueError, match="compiled with products='gemv'; one model takes one products"):
        compiled_layers(model, "inductor")


@pytest.mark.skipif(
    one_row_products.triton is None or one_row_products.interpreted(),
    reason="needs triton, not its interpreter (which turns the kernels into Python functions)",
)
@pytest.mark.parametrize("kernel", ["_gemv_kernel", "_silu_gate_up_kernel"])
def test_kernels_compile_for_a_gpu_when_triton_passes_sizes_of_1_as_constants(kernel):
    """Triton's launcher passes an integer argument equal to 1 as a constant, which the interpreter
    does not: a kernel calling a tensor method on it (``N.to(...)``) failed to compile for an MLP of
    one intermediate row on the GPU alone. Compiled here for an H100/H200 target without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "N", "K", "HAS_BIAS", "ROWS", "BLOCK_K", "EVEN"]
    constants = {"N": 1, "K": 1, "HAS_BIAS": True, "ROWS": 1, "BLOCK_K": 256, "EVEN": False}
    signature = {name: "constexpr" if name in constants else "*bf16" for name in names}
    source = ASTSource(
        fn=getattr(one_row_products, kernel),
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constants.items()},
    )
    one_row_products.triton.compile(source, target=GPUTarget("cuda", 90, 32))
