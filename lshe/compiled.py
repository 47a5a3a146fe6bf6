"""Regional `torch.compile` of a model's decode step (``compile=True``).

What is compiled: each decoder layer (the classes named in ``model._no_split_modules``, e.g.
``LlamaDecoderLayer``) as one `torch.compile` region, and the modules a step runs once outside them
(`step_modules`: rotary embedding, final norm, lm_head) and its greedy argmax as regions of their own.
Inductor fuses what runs as many small kernels in eager mode: RMSNorm (upcast, square, mean, rsqrt,
scale), RoPE, SiLU x up, the residual adds. Each attention module's q, k and v projections run as one
product (`lshe.fused_projections`). What is not compiled: the evicting cache's ``update`` and the
``"lshe"`` attention function (eviction, the slot writes, attention over the slots) are
`torch.compiler.disable`d, so each layer is two graphs with the cache step between them, run as the
eager code runs (its Triton kernels, its host-side counters). Every layer of one class shares one
compiled graph (the parameters are graph inputs).

Only the decode steps run compiled (`CompiledLayers.active`); the prefill stays eager, so a prompt
length never triggers a compilation. Compilation happens on the first compiled call (up to about two
minutes with the tuning below); under `lshe.fast_decode.Decoder` with ``graph=True`` that is a
warm-up step, and the captured CUDA graph replays the compiled kernels.

Inductor runs with coordinate-descent tuning (``tune=True``, the default; gpt-fast's setting). On a GPU
inductor then computes a one-row matrix product (every projection at batch 1) as its own Triton
reduction, fused with its neighbours (gate and up with SiLU x up), instead of cuBLAS, and tunes the
block sizes of every generated kernel by timing them at compilation. Measured on the H200 (Llama-3.1-8B
shape, batch 1): 5.66 -> 5.12 ms per LSH-E step at 256 tokens, compilation up to a minute or two longer
(docs/measurement-log.md, note 18). On the CPU it changes no product.

The block sizes inductor tunes are not stable: four fresh compilations of the same code gave a
Llama-3.1-8B layer 191-217 us of kernel time at batch 1, mostly in the down product (31-58 us;
docs/measurement-log.md, note 21). ``products="gemv"``, the default (`PRODUCTS`), computes every
one-row product of the layers with `lshe.one_row_products` instead, whose block sizes follow from the
shape: 193-194 us per layer in two compilations, and a batch-1 step within 1.23-1.29x of the bandwidth
floor in a third (note 22). ``products="inductor"`` keeps inductor's tuned reductions.

Inductor may order a reduction differently from eager PyTorch, so logits can differ in the last bits
of their precision; `tests/test_compiled.py` checks greedy tokens and logits against the eager step.
The tuned block sizes are chosen by timing, so two fresh compilations (no inductor cache on disk) may
round differently too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lshe import one_row_products
from lshe.fused_projections import GATE_UP, QKV, FusedProjections

# Raised from torch's default (8): with per-layer-type variants (sliding / full attention in Gemma2)
# and automatic dynamic shapes a model may need more than 8 graphs for one layer class.
RECOMPILE_LIMIT = 64
# Inductor's options with ``tune=True`` (see the module's docstring).
TUNED_OPTIONS = {"coordinate_descent_tuning": True}
# How the layers' one-row products run by default: "gemv" (`lshe.one_row_products`) or "inductor" (see
# the module's docstring).
PRODUCTS = "gemv"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: modules of the classes named in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"no decoder layers found in {type(model).__name__} (its _no_split_modules is {sorted(names)}): "
            "nothing to compile"
        )
    return layers


def step_modules(model: nn.Module) -> list[nn.Module]:
    """The modules a decode step runs once outside its decoder layers, each its own compiled region:
    the rotary embedding (a dozen small kernels eagerly: one or two compiled), the final norm and the
    output embedding (the lm_head: with the tuning, a one-row product like the layers'). Those a
    model lacks are skipped."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    found = [getattr(decoder, "rotary_emb", None), getattr(decoder, "norm", None)]
    if hasattr(model, "get_output_embeddings"):
        found.append(model.get_output_embeddings())
    return [m for m in found if isinstance(m, nn.Module) and m is not decoder]


def last_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, 1): the greedy token of each row's last position (first maximum on ties)."""
    return logits[:, -1].argmax(-1, keepdim=True)


class CompiledLayers:
    """The compiled forward of every decoder layer of ``model`` (and of `step_modules`), switched on
    inside `active`; `argmax` is the compiled `last_argmax`.

    Args:
        model: a causal LM (attention ``"lshe"`` for the evicting cache).
        mode: `torch.compile`'s mode. None (default) fuses kernels without CUDA graphs of its own: the
            decoder captures the whole step in one CUDA graph itself (``Decoder(graph=True)``).
        tune: inductor's coordinate-descent tuning (see the module's docstring); only with ``mode``
            None (`torch.compile` takes a mode or inductor options, not both).
        fuse_qkv: with ``products="inductor"``, compute each attention module's q, k and v projections
            as one product (`lshe.fused_projections`; modules without three plain ``nn.Linear``
            projections keep theirs). ``"gemv"`` always stacks them (and gate/up): False is refused there.
        products: None: `PRODUCTS` (``"gemv"``). ``"inductor"``: inductor computes the layers'
            products (with ``tune``, one-row products as tuned reductions, whose block sizes vary
            between compilations); ``"gemv"``:
            every plain ``nn.Linear`` of the layers through `lshe.one_row_products.linear` (fixed
            block sizes; q/k/v and gate/up stacked), opaque to inductor, and a Llama-style MLP's
            SiLU x up in its gate/up kernel (`lshe.fused_projections.GatedMLP`). The lm_head stays
            inductor's.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str | None = None,
        tune: bool = True,
        fuse_qkv: bool = True,
        products: str | None = None,
    ) -> None:
        products = products or PRODUCTS
        if products not in ("inductor", "gemv"):
            raise ValueError(f"products must be 'inductor' or 'gemv', got {products!r}")
        if products == "gemv" and not fuse_qkv:
            raise ValueError("fuse_qkv=False needs products='inductor': the GEMV products always stack q/k/v")
        self.layers = decoder_layers(model)
        self.regions = self.layers + step_modules(model)
        self.products = products
        if products == "gemv":
            self.fused = FusedProjections(
                self.layers, (QKV, GATE_UP), one_row_products.linear, one_row_products.silu_gate_up
            )
        else:
            self.fused = FusedProjections(self.layers) if fuse_qkv else None
        options = dict(TUNED_OPTIONS) if tune and mode is None else None
        self.compiled = [torch.compile(m._call_impl, mode=mode, options=options) for m in self.regions]
        # eager argmax over a 128k vocabulary is one slow reduction kernel (~30 us on the H200)
        self.argmax = torch.compile(last_argmax, mode=mode, options=options)

    @contextlib.contextmanager
    def active(self):
        """Calls of the decoder layers go through their compiled forward inside this block."""
        for region, compiled in zip(self.regions, self.compiled, strict=True):
            region._compiled_call_impl = compiled
        # Dynamo's settings for these layers only (tracing happens inside this block): a layer's
        # integer attributes (layer_idx) as graph inputs, so that one graph serves every layer.
        settings = torch._dynamo.config.patch(
            allow_unspec_int_on_nn_module=True,
            recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT),
        )
        fused = self.fused.active() if self.fused is not None else contextlib.nullcontext()
        try:
            with settings, fused:
                yield
        finally:
            for region in self.regions:
                region._compiled_call_impl = None


def compiled_layers(model: nn.Module, products: str | None = None) -> CompiledLayers:
    """The model's `CompiledLayers` with ``products`` (None: `PRODUCTS`), made once and kept on the
    model: every decoder of the model then reuses one compilation (each new `torch.compile` wrapper
    would compile the layers again). Another ``products`` on the same model is refused."""
    products = products or PRODUCTS
    made = model.__dict__.get("_lshe_compiled_layers")
    if made is None:
        made = model._lshe_compiled_layers = CompiledLayers(model, products=products)
    elif made.products != products:
        # A second set would restack the weights the first one's stacks (and CUDA graphs captured
        # with them) point at, and hold another copy of q/k/v (and gate/up) in memory.
        raise ValueError(
            f"this model's decoder layers are compiled with products={made.products!r}; one model "
            f"takes one products setting: load the model again for products={products!r}"
        )
    return made
