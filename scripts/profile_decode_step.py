"""CUDA kernels of one decode step per policy: count and time per layer, top kernels by time.

    python scripts/profile_decode_step.py --context 32768 --batch 1 static lshe knorm streaming random

A model in Llama-3.1-8B's shape (random bf16 weights) with ``--layers`` layers (default 4: a 32k
prompt at batch 27 still fits) is prefilled with random ids at ``--batch``; each policy's cache
(budget ``--budget``, ``prefill=window``; the static control ``prefill=streaming``) is decoded by
`lshe.fast_decode.Decoder`, eagerly (``--graph``: replaying a CUDA graph; kernel durations are the
same either way, launch gaps are not counted; ``--compile``: through the compiled decoder layers of
`lshe.compiled`; ``--products gemv``: its one-row products through `lshe.one_row_products`), 4 untimed steps, then 3 steps under ``torch.profiler``.
Kernel times are divided by steps and layers, so the lm_head's time shows as a quarter per layer
at 4 layers. What docs/measurement-log.md notes 13, 15, 17 and 18 are based on. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lshe.cache import EvictingCache  # noqa: E402
from lshe.compiled import CompiledLayers  # noqa: E402
from lshe.fast_decode import Decoder  # noqa: E402
from lshe.models import random_model  # noqa: E402
from policies import make_policy  # noqa: E402
from policies.static import StaticControl  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "conf/model/llama-3.1-8b-shape.yaml"
STEPS = 3


def profile_policy(
    model, ids: torch.Tensor, name: str, budget: float, layers: int, top: int, graph: bool,
    compile: CompiledLayers | bool,
) -> None:  # fmt: skip
    policy = StaticControl() if name == "static" else make_policy(name)
    prefill = "streaming" if name == "static" else "window"
    cache = EvictingCache(policy, budget=budget, max_new_tokens=40, prefill=prefill)
    with torch.inference_mode():
        first = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    positions = torch.full((ids.shape[0], 1), ids.shape[1], device=ids.device)
    decoder = Decoder(model, cache, first, positions, graph=graph, compile=compile)
    for _ in range(4):
        decoder.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            decoder.step()
        torch.cuda.synchronize()
    decoder.close()
    count, time_us = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count[event.name[:70]] += 1
            time_us[event.name[:70]] += event.device_time_total
    per = STEPS * layers
    print(
        f"== batch {ids.shape[0]} {name}: {sum(count.values()) / per:.1f} kernels and "
        f"{sum(time_us.values()) / per:.1f} us of kernel time per layer and step"
    )
    for kernel, total in time_us.most_common(top):
        print(f"   {total / per:8.1f} us  {count[kernel] / per:5.1f}x  {kernel}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", help="policy names, or 'static' for the static control")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per policy")
    parser.add_argument("--graph", action="store_true", help="decode by replaying a CUDA graph")
    parser.add_argument("--compile", action="store_true", help="decode through the compiled decoder layers")
    parser.add_argument(
        "--products", default=None, choices=["inductor", "gemv"],
        help="the compiled layers' one-row products (default: lshe.compiled.PRODUCTS)",
    )  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.products and not args.compile:
        parser.error("--products chooses how the compiled layers compute their products: add --compile")
    spec = yaml.safe_load(CONFIG.read_text())
    model, _ = random_model(
        "profile", dict(spec["config"], num_hidden_layers=args.layers), dtype="bfloat16", device="cuda"
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(300, 100000, (args.batch, args.context), generator=generator).cuda()
    compiled = CompiledLayers(model, products=args.products) if args.compile else False
    for name in args.policies:
        profile_policy(model, ids, name, args.budget, args.layers, args.top, args.graph, compiled)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
