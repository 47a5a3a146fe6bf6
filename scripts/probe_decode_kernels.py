"""Time the cache step's Triton kernels alone, in their launch settings: split-KV decode attention (one
launch for short caches, or split and merge; programs per multiprocessor, BLOCK_N, warps, stages) and
the fused LSH-E step (programs per multiprocessor), and the step's writes folded into the attention
launch against `write_kv` and a separate position advance.

    python scripts/probe_decode_kernels.py [probe ...]   # all by default; probes: see PROBES

Shapes are Llama-3.1-8B's (8 KV heads, 4 query heads each, head_dim 128, bf16; LSH-E with 16 bits and
8 recent slots). Each setting is timed as a CUDA graph of 20-50 calls, the median of 15 replays, in
microseconds per call (the gaps between kernels included, as in a decode step's graph); attention also
in TB/s of key and value bytes. The module constants of `lshe.kernels` are set for each setting and
restored after. What docs/measurement-log.md note 19 is based on (the probes of that session's leases,
tidied). Needs a CUDA GPU.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lshe import kernels  # noqa: E402

DEVICE, DTYPE = "cuda", torch.bfloat16
HEADS, GROUP, DIM = 8, 4, 128


def per_call_us(fn, *args, calls: int = 20, replays: int = 15) -> float:
    """Median microseconds per call of ``fn(*args)`` replayed from a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def with_settings(**settings):
    """Set `lshe.kernels` constants for one measurement; returns a function that restores them."""
    saved = {name: getattr(kernels, name) for name in settings}
    for name, value in settings.items():
        setattr(kernels, name, value)
    return lambda: [setattr(kernels, name, value) for name, value in saved.items()]


def attention_inputs(batch: int, slots: int):
    query = torch.randn(batch, HEADS * GROUP, 1, DIM, device=DEVICE, dtype=DTYPE)
    keys = torch.randn(batch, HEADS, slots, DIM, device=DEVICE, dtype=DTYPE)
    return query, keys, torch.randn_like(keys)


def one_split_against_merge() -> None:
    print("== attention, batch 1: one launch vs split + merge (us per call)")
    for slots in (77, 128, 192, 256, 330, 512):
        query, keys, values = attention_inputs(1, slots)
        line = []
        for name, limit in (("split + merge", 0), ("one launch", 1 << 30)):
            restore = with_settings(ONE_SPLIT_SLOTS=limit)
            line.append(
                f"{name} {per_call_us(kernels.decode_attention, query, keys, values, None, 0.088):.2f}"
            )
            restore()
        print(f"{slots:6d} slots: " + " | ".join(line))


def attention_settings() -> None:
    print("== attention: programs per SM x BLOCK_N x warps x stages: us (TB/s of keys and values)")
    settings = [(4, 64, 4, 2), (8, 64, 4, 2), (16, 64, 4, 2), (4, 32, 4, 2), (4, 128, 4, 2), (8, 128, 4, 2),
                (4, 64, 4, 3), (4, 64, 4, 4), (4, 64, 8, 2), (4, 64, 2, 3)]  # fmt: skip
    for batch, slots in ((1, 32768), (1, 9830), (1, 2458), (27, 9830)):
        query, keys, values = attention_inputs(batch, slots)
        nbytes = 2 * keys.numel() * keys.element_size()
        line = []
        for programs, block_n, warps, stages in settings:
            restore = with_settings(ATTENTION_PROGRAMS_PER_SM=programs, BLOCK_N=block_n,
                                    ATTENTION_WARPS=warps, ATTENTION_STAGES=stages)  # fmt: skip
            us = per_call_us(kernels.decode_attention, query, keys, values, None, 0.088)
            restore()
            line.append(f"{programs}p{block_n}n{warps}w{stages}s {us:.1f} ({nbytes / us / 1e6:.2f})")
        print(f"batch {batch}, {slots} slots: " + " | ".join(line))


def lshe_step_programs() -> None:
    print("== LSH-E step: programs per SM (0: one program per row and KV head, no atomics): us per call")
    for batch, slots in ((1, 77), (1, 2458), (1, 9830), (27, 9830), (27, 16384)):
        query = torch.randn(batch, HEADS * GROUP, 1, DIM, device=DEVICE, dtype=DTYPE)
        key = torch.randn(batch, HEADS, 1, DIM, device=DEVICE, dtype=DTYPE)
        projection = torch.randn(DIM, 16, device=DEVICE)
        codes = torch.randint(0, 256, (batch, HEADS, slots, 2), device=DEVICE, dtype=torch.uint8)
        valid = torch.ones(batch, HEADS, slots, dtype=torch.bool, device=DEVICE)
        usable = torch.ones(batch, 1, slots, dtype=torch.bool, device=DEVICE)
        recent = torch.arange(slots - 8, slots, device=DEVICE).expand(batch, HEADS, 8).contiguous()
        line = []
        for programs in (0, 2, 4, 8, 16, 32):
            restore = with_settings(STEP_PROGRAMS_PER_SM=programs)
            args = query, key, projection, codes, valid, usable, recent, 4
            line.append(f"{programs}: {per_call_us(kernels.lshe_step, *args, calls=50):.1f}")
            restore()
        print(f"batch {batch}, {slots} slots: " + " | ".join(line))


def folded_writes() -> None:
    print("== the step's writes: write_kv + attention vs one attention launch that writes (us per call)")
    for batch, slots in ((1, 77), (1, 2458), (1, 9830), (1, 32768), (27, 9830)):
        query, keys, values = attention_inputs(batch, slots)
        key = torch.randn(batch, 1, HEADS, DIM, device=DEVICE, dtype=DTYPE).transpose(1, 2)
        value = torch.randn_like(key)
        slot = torch.randint(0, slots, (batch, HEADS, 1), device=DEVICE)
        position = torch.zeros(batch, dtype=torch.int64, device=DEVICE)
        write = kernels.SlotWrite(slot, key, value, next_position=position)

        def separate(query, keys, values, slot, key, value, position):
            kernels.write_kv(keys, values, slot, key, value)
            kernels.decode_attention(query, keys, values, None, 0.088)
            position.add_(1)

        def folded(query, keys, values, write):
            kernels.decode_attention(query, keys, values, None, 0.088, write=write)

        attention = per_call_us(kernels.decode_attention, query, keys, values, None, 0.088)
        print(f"batch {batch}, {slots} slots: attention alone {attention:.2f} | separate "
              f"{per_call_us(separate, query, keys, values, slot, key, value, position):.2f}"
              f" | folded {per_call_us(folded, query, keys, values, write):.2f}"
              f" | folded, no position {per_call_us(folded, query, keys, values, kernels.SlotWrite(slot, key, value)):.2f}")  # fmt: skip


def split_kernel_registers() -> None:
    """Registers and spills of every compiled variant of the split attention kernel so far."""
    print("== split attention kernel variants: registers, spills")
    for cache in getattr(kernels._attention_split_kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            flags = {name: value for name, value in compiled.src.constants.items() if isinstance(value, bool)}
            print(f"  regs {compiled.n_regs} spills {compiled.n_spills} {flags}")


PROBES = {
    f.__name__: f
    for f in (
        one_split_against_merge,
        attention_settings,
        lshe_step_programs,
        folded_writes,
        split_kernel_registers,
    )
}

if __name__ == "__main__":
    if not kernels.available():
        sys.exit("needs triton and a CUDA GPU")
    for name in sys.argv[1:] or PROBES:
        PROBES[name]()
