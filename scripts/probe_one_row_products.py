"""Bandwidth of one-row matrix products (batch-1 decode) on Llama-3.1-8B's shapes: cuBLAS, inductor with
coordinate-descent tuning (what ``runner.compile=true`` uses), `lshe.one_row_products` (its block sizes
from its rule; ``products="gemv"``), and a plain Triton GEMV in a few block configurations.

    python scripts/probe_one_row_products.py          # every shape, every product
    python scripts/probe_one_row_products.py --gated  # gate+up with its SiLU x up: two kernels or one

Each product ``x (1, K) @ W.T`` (W (N, K) bf16) is timed as a CUDA graph of one call per weight copy,
over enough copies (> 600 MB) that no weight is read from L2; the time per call includes the gap
between kernels, as in a decode step's graph. (The lease behind note 18 timed the inductor column with
an extra copy of the output into ``o``, a second small kernel per call; this script leaves it out.) Prints microseconds per call and TB/s of weight bytes
next to the device's copy bandwidth. What docs/measurement-log.md note 18 is based on. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lshe import one_row_products  # noqa: E402

SHAPES = {  # (N, K) as nn.Linear weights; q/k/v and gate/up fused are what fused weights would read
    "k or v": (1024, 4096),
    "q or o": (4096, 4096),
    "q+k+v": (6144, 4096),
    "gate or up": (14336, 4096),
    "gate+up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
CONFIGS = [
    (2, 1024, 4, 3),
    (4, 512, 4, 3),
    (8, 512, 4, 3),
    (8, 256, 4, 4),
    (16, 512, 8, 2),
]  # rows, K block, warps, stages


@triton.jit
def _gemv(x, w, y, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per ROWS rows of W: float32 products summed over K in BLOCK_K steps."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        tile = tl.load(w + rows[:, None].to(tl.int64) * K + cols[None, :], eviction_policy="evict_first")
        acc += tile.to(tl.float32) * tl.load(x + cols).to(tl.float32)[None, :]
    tl.store(y + rows, tl.sum(acc, 1).to(y.dtype.element_ty))


def triton_gemv(rows: int, block_k: int, warps: int, stages: int):
    def product(x, w, out):
        _gemv[(w.shape[0] // rows,)](
            x, w, out, w.shape[1], ROWS=rows, BLOCK_K=block_k, num_warps=warps, num_stages=stages
        )

    return product


def us_per_call(product, weights, x, outs) -> float:
    """Median over replays of a CUDA graph that calls ``product`` once per weight copy."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w, o in zip(weights, outs, strict=True):
            product(x, w, o)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, o in zip(weights, outs, strict=True):
            product(x, w, o)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    return statistics.median(times[2:])


def copy_bandwidth() -> float:
    """TB/s of a 256 MiB device-to-device copy (bytes read + written), as runners/measure.py counts it."""
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / start.elapsed_time(end) / 1e9


def gated(block_ks=(256, 512, 1024)) -> None:
    """Llama-3.1-8B's gate+up and SiLU x up: the GEMV then a compiled SiLU x up (two kernels), against
    `lshe.one_row_products.silu_gate_up` (one) at its own rows per program and several K blocks."""
    n, k = SHAPES["gate+up"]
    nbytes = n * k * 2
    weights = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(max(2, math.ceil(600e6 / nbytes)))
    ]
    outs = [torch.empty(1, n // 2, device="cuda", dtype=torch.bfloat16) for _ in weights]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    silu_up = torch.compile(lambda g, u: F.silu(g) * u, dynamic=False)

    def two_kernels(x_, w, o):
        return silu_up(*torch.ops.lshe.one_row_linear(x_, w, None).chunk(2, dim=-1))

    times = {f"gemv ({one_row_products.config(n, x.device)} rows) + compiled SiLU x up": two_kernels}
    rows = max(1, one_row_products.config(n // 2, x.device) // 2)
    for block_k in block_ks:
        times[f"silu_gate_up ({rows} rows, BLOCK_K {block_k})"] = block_k
    default = one_row_products.GATED_BLOCK_K
    for label, product in times.items():
        if isinstance(product, int):
            one_row_products.GATED_BLOCK_K = product
            product = lambda x_, w, o: torch.ops.lshe.one_row_silu_gate_up(x_, w, None)  # noqa: E731
        t = us_per_call(product, weights, x, outs)
        print(f"gate+up ({n} x {k}): {label} {t:.1f} us ({nbytes / t / 1e6:.2f} TB/s)", flush=True)
    one_row_products.GATED_BLOCK_K = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gated", action="store_true", help="only gate+up with its SiLU x up")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"copy bandwidth {copy_bandwidth():.2f} TB/s")
    torch.manual_seed(0)
    if args.gated:
        gated()
        return
    torch.manual_seed(0)
    x = torch.randn(1, max(k for _, k in SHAPES.values()), device="cuda", dtype=torch.bfloat16)
    tuned = torch.compile(
        lambda x, w: F.linear(x, w), options={"coordinate_descent_tuning": True}, dynamic=False
    )
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        weights = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(max(2, math.ceil(600e6 / nbytes)))
        ]
        outs = [torch.empty(1, n, device="cuda", dtype=torch.bfloat16) for _ in weights]
        xk = x[:, :k].contiguous()
        times = {
            "cuBLAS": us_per_call(lambda x_, w, o: torch.mm(x_, w.t(), out=o), weights, xk, outs),
            "inductor+cd": us_per_call(lambda x_, w, o: tuned(x_, w), weights, xk, outs),  # its own output
            f"lshe gemv ({one_row_products.config(n, xk.device)} rows)": us_per_call(
                lambda x_, w, o: torch.ops.lshe.one_row_linear(x_, w, None), weights, xk, outs
            ),  # its own output
        }
        for config in CONFIGS:
            if n % config[0] == 0 and k % config[1] == 0:
                times[f"triton{config}"] = us_per_call(triton_gemv(*config), weights, xk, outs)
        cells = "  ".join(f"{label} {t:.1f} us ({nbytes / t / 1e6:.2f} TB/s)" for label, t in times.items())
        print(f"{name} ({n} x {k}, {nbytes / 1e6:.1f} MB): {cells}", flush=True)
        del weights, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
