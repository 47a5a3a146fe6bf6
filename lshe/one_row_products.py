"""One-row matrix products (every projection of a batch-1 decode step) as a Triton GEMV whose block
sizes do not depend on a compilation (`lshe.compiled`, ``products="gemv"``).

Why: with coordinate-descent tuning inductor computes ``x (1, K) @ W.T`` as a reduction of its own and
picks its block sizes by timing that kernel alone while it compiles. The choice is not stable and alone
does not rank configs as a decode step does: four fresh compilations of the same code on one H200 gave
Llama-3.1-8B's down product 31-58 us in the step, up to 14% of the whole step
(docs/measurement-log.md, note 21). This GEMV's block sizes follow from the shape alone (`config`), so
every compilation runs the same kernel. Measured on the H200 (Llama-3.1-8B shape, batch 1, 256 tokens,
two fresh compilations): the four products of a layer 109.8 / 109.4 us, the static control's layer
194.4 / 193.2 us of kernel time, against 191.0-217.0 us over four compilations with inductor's products.
Alone, in a CUDA graph over weights that do not fit in L2 as a step reads them
(`scripts/probe_one_row_products.py`), its rule is within 0.3 us of the best of five fixed
configurations for q/o, q+k+v and down, and 1.8 us (3%) behind it for gate+up.

`linear` is the custom op ``lshe::one_row_linear``: opaque to inductor, which therefore materialises
its input (a SiLU x up or a norm it would otherwise fuse into the product's loads: one small kernel)
and cannot fuse the residual add after it. The GEMV runs where the input has one row and the tensors
are on a CUDA device (or under Triton's CPU interpreter, ``TRITON_INTERPRET=1``, for tests); anything
else is ``F.linear``, as inductor itself leaves products of several rows to cuBLAS.

`silu_gate_up` is the op ``lshe::one_row_silu_gate_up``: a gated MLP's ``silu(gate(x)) * up(x)`` from
the stacked gate/up weight in one kernel (`lshe.fused_projections.GatedMLP`), so that the SiLU x up
that inductor can no longer fuse into the products' loads is not a launch of its own (one kernel fewer
per layer). Its blocks: half the GEMV's rows per program (two weight rows per output) and
``GATED_BLOCK_K`` = 256. Measured alone on the H200 (Llama-3.1-8B's gate+up, 28672 x 4096; the
script of note 22): 56.1 us, against 59.3 us for the GEMV (16 rows) and a compiled SiLU x up; the
same kernel with ``BLOCK_K`` 512 took 58.9 us.

Each output is the float32 sum of the row's products in blocks of ``BLOCK_K``, rounded once to the
input's dtype (plus the bias in float32): the same value as cuBLAS's up to the order of the sum, so
logits can differ from the eager step's in their last bits, as inductor's own reductions make them.
`silu_gate_up` then rounds as the eager ``F.silu(g) * u`` does: SiLU of the rounded gate in float32,
rounded, times the rounded up, rounded.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from lshe.kernels import multiprocessors, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

PROGRAMS_PER_SM = 4  # rows per program are halved until the grid has at least this many per SM
MAX_ROWS = 16  # output rows one program computes, at most
BLOCK_K = 512  # input elements one program multiplies per iteration
GATED_BLOCK_K = 256  # the same for `silu_gate_up`, which multiplies two rows per output
WARPS, STAGES = 4, 3


def interpreted() -> bool:
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """The GEMV computes ``F.linear(x, weight, bias)``: one row, a contiguous 2-D weight and a
    contiguous (N,) bias (or none) of x's dtype and device, on a CUDA device (or the interpreter).
    Anything else, a broadcast bias included, is left to ``F.linear``."""
    if bias is not None and not (
        bias.shape == weight.shape[:1]
        and bias.is_contiguous()
        and bias.dtype == x.dtype
        and bias.device == x.device
    ):
        return False
    return (
        triton is not None
        and (x.is_cuda or interpreted())
        and x.numel() == x.shape[-1] == weight.shape[-1]
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.dtype == x.dtype
        and weight.device == x.device
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def config(out_features: int, device: torch.device) -> int:
    """Rows per program: the most (up to MAX_ROWS) that still give PROGRAMS_PER_SM programs per
    multiprocessor, so that a short output (a K/V projection) still spreads over the whole GPU."""
    programs = PROGRAMS_PER_SM * multiprocessors(device)
    rows = MAX_ROWS
    while rows > 1 and triton.cdiv(out_features, rows) < programs:
        rows //= 2
    return rows


@torch.library.custom_op("lshe::one_row_linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a one-row ``x`` through the GEMV (see the module's docstring)."""
    if not applies(x, weight, bias):
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    return _launch(_gemv_kernel, x, weight, bias, n, config(n, x.device), BLOCK_K)


@linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lshe::one_row_silu_gate_up", mutates_args=())
def silu_gate_up(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.silu(g) * u`` with ``g, u = F.linear(x, weight, bias).chunk(2, -1)``: ``weight`` is a gated
    MLP's gate and up weights stacked (2 I, K). A one-row ``x`` through one GEMV kernel, anything else
    (see `applies`) through ``F.linear`` and the eager SiLU and product."""
    if weight.shape[0] % 2 or not applies(x, weight, bias):
        gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
        return F.silu(gate) * up
    n = weight.shape[0] // 2
    rows = max(1, config(n, x.device) // 2)  # two weight rows per output: as many rows per program
    return _launch(_silu_gate_up_kernel, x, weight, bias, n, rows, GATED_BLOCK_K)


@silu_gate_up.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


def _launch(kernel, x, weight, bias, n: int, rows: int, block_k: int) -> torch.Tensor:
    """``kernel``'s (..., n) output for the one-row ``x``: ``rows`` outputs per program, K in blocks
    of ``block_k`` (a bias-less launch passes the weight as its unused bias pointer)."""
    k = weight.shape[1]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    x_row = x.reshape(k)
    if x_row.stride(0) != 1:
        x_row = x_row.contiguous()
    with on_device(x.device):
        kernel[(triton.cdiv(n, rows),)](
            x_row, weight, bias if bias is not None else weight, out, n, k,
            HAS_BIAS=bias is not None, ROWS=rows, BLOCK_K=block_k,
            EVEN=n % rows == 0 and k % block_k == 0, num_warps=WARPS, num_stages=STAGES,
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, N, K,
        HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        """Program p: outputs [p * ROWS, (p + 1) * ROWS), each a float32 sum over K in BLOCK_K steps
        (the weight streamed once, marked to leave L2 first)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        acc = tl.zeros((ROWS, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            pointers = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
            if EVEN:
                tile = tl.load(pointers, eviction_policy="evict_first")
                x = tl.load(x_ptr + cols)
            else:
                inside = (rows[:, None] < N) & (cols[None, :] < K)
                tile = tl.load(pointers, mask=inside, other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            acc += tile.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, 1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _silu_gate_up_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, N, K,
        HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        """Program p: outputs [p * ROWS, (p + 1) * ROWS) of silu(gate) * up, from the gate rows and
        the up rows N further down the stacked weight; each product as in `_gemv_kernel`."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        up_offset = tl.cast(N, tl.int64) * K  # tl.cast, not N.to: Triton passes an N of 1 as a constant
        gate_acc = tl.zeros((ROWS, BLOCK_K), tl.float32)
        up_acc = tl.zeros((ROWS, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            pointers = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
            up_pointers = pointers + up_offset
            if EVEN:
                gate_tile = tl.load(pointers, eviction_policy="evict_first")
                up_tile = tl.load(up_pointers, eviction_policy="evict_first")
                x = tl.load(x_ptr + cols)
            else:
                inside = (rows[:, None] < N) & (cols[None, :] < K)
                gate_tile = tl.load(pointers, mask=inside, other=0.0, eviction_policy="evict_first")
                up_tile = tl.load(up_pointers, mask=inside, other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            x = x.to(tl.float32)[None, :]
            gate_acc += gate_tile.to(tl.float32) * x
            up_acc += up_tile.to(tl.float32) * x
        gate = tl.sum(gate_acc, 1)
        up = tl.sum(up_acc, 1)
        if HAS_BIAS:
            gate += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
            up += tl.load(b_ptr + N + rows, mask=rows < N, other=0.0).to(tl.float32)
        dtype = y_ptr.dtype.element_ty
        gate = gate.to(dtype).to(tl.float32)  # rounded as the eager products are
        up = up.to(dtype).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu, rounded
        tl.store(y_ptr + rows, (activated * up).to(dtype), mask=rows < N)
