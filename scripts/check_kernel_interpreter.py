"""Run the fused LSH-E step (plain and norm-aware) under Triton's CPU interpreter against the torch path.

    TRITON_INTERPRET=1 PYTHONPATH=<a folder holding triton> python scripts/check_kernel_interpreter.py

Needs only the ``triton`` package (``pip install triton --no-deps --target <folder>``), no GPU: the
kernel runs on CPU tensors, and every step's cache state (keys, validity, codes, norms, recent list)
must equal the torch path's. tests/test_kernels_norm.py runs it where triton is importable.
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from lshe import kernels  # noqa: E402
from lshe.cache import EvictingCache  # noqa: E402
from policies.lshe import LSHEPolicy  # noqa: E402

if kernels.triton is None:
    sys.exit("triton is not importable: put a folder holding it on PYTHONPATH")


def check(norm_aware, probe, group, proj_dim, slots, prompt, steps=12, seed=0):
    torch.manual_seed(seed)
    batch, heads, dim = 2, 2, 16
    caches = [
        EvictingCache(
            LSHEPolicy(proj_dim=proj_dim, probe=probe, seed=1, norm_aware=norm_aware),
            budget=slots,
            sink=2,
            recent=3,
            prefill="streaming",
        )
        for _ in range(2)
    ]
    keys = torch.randn(batch, heads, prompt, dim) * (0.5 + torch.rand(batch, heads, prompt, 1))
    values = torch.randn_like(keys)
    q = torch.randn(batch, heads * group, prompt, dim)
    for c in caches:
        c.update(keys, values, 0)
        c.layers[0].attend(q, None, 1.0)
    fused_layer, ref_layer = caches[0].layers[0], caches[1].layers[0]
    policy = caches[0].policy
    for step in range(steps):
        qq = torch.randn(batch, heads * group, 1, dim)
        k = torch.randn(batch, heads, 1, dim) * (0.5 + torch.rand(batch, heads, 1, 1))
        v = torch.randn_like(k)
        # fused: the kernel on the layer's tensors, then keys/values written as the layer does
        slot = kernels.lshe_step(
            qq,
            k,
            policy.projection(0, dim, qq.device),
            fused_layer.features["codes"],
            fused_layer.valid,
            fused_layer.usable,
            fused_layer.recent_slots,
            fused_layer.sink,
            probe_query=probe == "query",
            norms=fused_layer.features["norm"] if norm_aware else None,
            cos_table=policy.cos_table(qq.device) if norm_aware else None,
        )
        kernels.SlotWrite(slot, k, v).before_attention(fused_layer.keys, fused_layer.values)
        fused_layer.next_position.add_(1)
        fused_layer.advance_fill(1)
        caches[1].update(k, v, 0)
        ref_layer.attend(qq, None, 1.0)
        assert torch.equal(fused_layer.keys, ref_layer.keys), (step, "victims differ")
        assert torch.equal(fused_layer.valid, ref_layer.valid)
        assert torch.equal(fused_layer.recent_slots, ref_layer.recent_slots)
        for name in fused_layer.features:
            assert torch.equal(fused_layer.features[name], ref_layer.features[name]), name
    return True


for args in [
    (True, "query", 4, 16, 40, 40),
    (True, "key", 2, 8, 40, 40),
    (True, "query", 3, 13, 40, 30),
    (False, "query", 4, 16, 40, 40),
    (True, "query", 2, 32, 1100, 1100),
    (False, "key", 2, 8, 2100, 2100),  # several tiles per program: the lanes' running best
]:
    print(args, check(*args))
