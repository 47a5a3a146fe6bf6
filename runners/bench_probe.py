"""GPU ceilings and per-layer costs behind the benchmark's numbers: ``python -m runners.bench_probe``.

Prints one JSON object (and writes it to ``--out``) with:

* ``hbm_gbps``: device-to-device copy bandwidth, bytes read + written per second (the ceiling the
  memory-bandwidth floor of a decode step is computed with);
* ``attention_us``: one layer's decode attention (Llama-3.1-8B shape: 8 KV heads x 4 query heads,
  head_dim 128, bf16) over S slots at batch 1 and a large batch, for the SDPA variants the cache can
  use: unmasked with the query heads of a group as queries (every slot valid), the same with a
  (B, H, 1, S) validity mask, ``enable_gqa`` with 32 one-token query heads, and the split-KV Triton
  kernel `lshe.kernels.decode_attention` without and with the mask;
* ``lshe_step_us``: one layer's LSH-E victim choice and state update, fused Triton kernel against the
  torch path (policy score, protection, argmin, scatters), and the static control's slot
  computation, each replayed from a CUDA graph of 32 calls so launch gaps count as in a decode step.

CUDA only. Times are medians of CUDA-event-timed repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.functional import scaled_dot_product_attention

from lshe import kernels
from lshe.cache import EvictingCache
from policies.lshe import LSHEPolicy
from policies.static import StaticControl
from runners import measure

HEADS, GROUP, DIM = 8, 4, 128


def _median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` on the GPU after ``warmup`` calls (`runners.measure.Stopwatch`)."""
    for _ in range(warmup):
        fn()
    watch = measure.Stopwatch("cuda")
    for _ in range(reps):
        watch.time(fn)
    return measure.median(watch.pairs_ms())


def attention(batch: int, slots: int) -> dict[str, float]:
    """Microseconds of one layer's decode attention for each SDPA variant."""
    q = torch.randn(batch, HEADS * GROUP, 1, DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, HEADS, slots, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    valid = torch.ones(batch, HEADS, slots, dtype=torch.bool, device="cuda")
    valid[..., -7:] = False
    grouped = q.reshape(batch, HEADS, GROUP, DIM)
    variants = {
        "grouped_unmasked": lambda: scaled_dot_product_attention(grouped, k, v),
        "grouped_masked": lambda: scaled_dot_product_attention(grouped, k, v, attn_mask=valid[:, :, None, :]),
        "gqa_unmasked": lambda: scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "triton_unmasked": lambda: kernels.decode_attention(q, k, v, None, DIM**-0.5),
        "triton_masked": lambda: kernels.decode_attention(q, k, v, valid, DIM**-0.5),
    }
    out = {name: 1e3 * _median_ms(fn) for name, fn in variants.items()}
    out["kv_bytes"] = 2 * k.nbytes
    out["floor_us"] = None
    return out


def _graphed(fn, calls: int = 32):
    """A CUDA graph of ``calls`` calls of fn; returns a function replaying it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def lshe_step(batch: int, slots: int, calls: int = 32) -> dict[str, float]:
    """Microseconds per layer call: fused LSH-E step, torch LSH-E step, static control slot."""
    out = {}
    keys = torch.randn(batch, HEADS, slots, DIM, device="cuda", dtype=torch.bfloat16)
    query = torch.randn(batch, HEADS * GROUP, 1, DIM, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
    for label, fused, control in (("fused", True, False), ("torch", False, False), ("control", True, True)):
        policy = StaticControl() if control else LSHEPolicy(proj_dim=16)
        cache = EvictingCache(policy, budget=slots, prefill="streaming", fused=fused)
        cache.update(keys, keys, 0)
        layer = cache.layers[0]
        layer.attend(query.expand(-1, -1, slots, -1), None, 1.0)

        if control:

            def choose(layer=layer):
                layer.policy.fused_step(layer, query, key)
        else:

            def choose(layer=layer):
                slot = layer.policy.fused_step(layer, query, key) if layer.settings.fused else None
                if slot is None:
                    features = layer.policy.token_features(0, key, layer.next_position[:, None])
                    slot, _ = layer.choose_slot(query, key, features)
                    layer.write_state(slot, features)

        replay = _graphed(choose, calls)
        out[label] = 1e3 * _median_ms(replay) / calls
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m runners.bench_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", nargs="+", type=int, default=[3277, 9831, 16385, 32768])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 24])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "graph_generators": hasattr(torch.cuda.CUDAGraph, "register_generator_state"),
        "hbm_gbps": measure.hbm_gbps("cuda", gib=4.0),
        "attention_us": {},
        "lshe_step_us": {},
    }
    for batch in args.batches:
        for slots in args.slots:
            key = f"b{batch}_s{slots}"
            att = attention(batch, slots)
            att["floor_us"] = att["kv_bytes"] / (result["hbm_gbps"] * 1e9) * 1e6
            result["attention_us"][key] = att
            result["lshe_step_us"][key] = lshe_step(batch, slots)
            print(key, json.dumps(att), json.dumps(result["lshe_step_us"][key]), flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
