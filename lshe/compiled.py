"""Regional `torch.compile` of a model's decoder layers for the decode step (``compile=True``).

What is compiled: each decoder layer (the classes named in ``model._no_split_modules``, e.g.
``LlamaDecoderLayer``) as one `torch.compile` region. Inductor fuses what runs as many small kernels in
eager mode: RMSNorm (upcast, square, mean, rsqrt, scale), RoPE, SiLU x up, the residual adds. What is
not: the evicting cache's ``update`` and the ``"lshe"`` attention function (eviction, the slot
writes, attention over the slots) are `torch.compiler.disable`d, so each layer is two graphs with the
cache step between them, run as the eager code runs (its Triton kernels, its host-side counters).
Every layer of one class shares one compiled graph (the parameters are graph inputs).

Only the decode steps run compiled (`CompiledLayers.active`); the prefill stays eager, so a prompt
length never triggers a compilation. Compilation happens on the first compiled call (up to about two
minutes with the tuning below); under `lshe.fast_decode.Decoder` with ``graph=True`` that is a warm-up step, and the captured
CUDA graph replays the compiled kernels.

Inductor runs with coordinate-descent tuning (``tune=True``, the default; gpt-fast's setting). On a GPU
inductor then computes a one-row matrix product (every projection at batch 1) as its own Triton
reduction, fused with its neighbours (gate and up with SiLU x up), instead of cuBLAS, and tunes the
block sizes of every generated kernel by timing them at compilation. Measured on the H200 (Llama-3.1-8B
shape, batch 1): 5.66 -> 5.12 ms per LSH-E step at 256 tokens, compilation up to a minute or two longer
(docs/measurement-log.md, note 18). On the CPU it changes no product.

Inductor may order a reduction differently from eager PyTorch, so logits can differ in the last bits
of their precision; `tests/test_compiled.py` checks greedy tokens and logits against the eager step.
The tuned block sizes are chosen by timing, so two fresh compilations (no inductor cache on disk) may
round differently too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Raised from torch's default (8): with per-layer-type variants (sliding / full attention in Gemma2)
# and automatic dynamic shapes a model may need more than 8 graphs for one layer class.
RECOMPILE_LIMIT = 64


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


class CompiledLayers:
    """The compiled forward of every decoder layer of ``model``, switched on inside `active`.

    Args:
        model: a causal LM (attention ``"lshe"`` for the evicting cache).
        mode: `torch.compile`'s mode. None (default) fuses kernels without CUDA graphs of its own: the
            decoder captures the whole step in one CUDA graph itself (``Decoder(graph=True)``).
        tune: inductor's coordinate-descent tuning (see the module's docstring); only with ``mode``
            None (`torch.compile` takes a mode or inductor options, not both).
    """

    def __init__(self, model: nn.Module, mode: str | None = None, tune: bool = True) -> None:
        self.layers = decoder_layers(model)
        options = {"coordinate_descent_tuning": True} if tune and mode is None else None
        self.compiled = [torch.compile(layer._call_impl, mode=mode, options=options) for layer in self.layers]

    @contextlib.contextmanager
    def active(self):
        """Calls of the decoder layers go through their compiled forward inside this block."""
        for layer, compiled in zip(self.layers, self.compiled, strict=True):
            layer._compiled_call_impl = compiled
        # Dynamo's settings for these layers only (tracing happens inside this block): a layer's
        # integer attributes (layer_idx) as graph inputs, so that one graph serves every layer.
        settings = torch._dynamo.config.patch(
            allow_unspec_int_on_nn_module=True,
            recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT),
        )
        try:
            with settings:
                yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None


def compiled_layers(model: nn.Module) -> CompiledLayers:
    """The model's `CompiledLayers`, made once and kept on the model: every decoder of the model then
    reuses one compilation (each new `torch.compile` wrapper would compile the layers again)."""
    compiled = getattr(model, "_lshe_compiled_layers", None)
    if compiled is None:
        compiled = CompiledLayers(model)
        model._lshe_compiled_layers = compiled
    return compiled
