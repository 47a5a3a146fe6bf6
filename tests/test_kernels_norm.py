"""Norm-aware LSH-E's fused step (lshe.kernels.lshe_step with norms) chooses the torch path's victims."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels import draw

from lshe import kernels
from lshe.cache import EvictingCache
from policies.lshe import LSHEPolicy

REPO = Path(__file__).resolve().parent.parent
gpu = pytest.mark.skipif(
    not kernels.available(), reason="the fused kernel needs triton and a CUDA GPU (CPU runs the torch path)"
)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("group", "proj_dim", "probe", "slots", "prompt"),
    [
        (4, 16, "query", 96, 96),
        (4, 16, "key", 96, 96),
        (3, 13, "query", 300, 300),
        (2, 32, "query", 4100, 4100),  # several blocks, 32-bit codes
        (4, 16, "query", 96, 80),  # empty slots first
    ],
)
def test_norm_aware_fused_step_equals_torch_path(dtype, group, proj_dim, probe, slots, prompt):
    batch, heads, dim, sink, recent = 3, 2, 64, 4, 10
    generator = torch.Generator(device="cuda").manual_seed(slots + proj_dim + group)
    caches = [
        EvictingCache(
            LSHEPolicy(proj_dim=proj_dim, probe=probe, seed=1, norm_aware=True),
            budget=slots,
            sink=sink,
            recent=recent,
            prefill="streaming",
            fused=fused,
        )  # fmt: skip
        for fused in (True, False)
    ]
    projection = caches[0].policy.projection(0, dim, torch.device("cuda"))
    scale = 0.5 + torch.rand(batch, heads, prompt, 1, generator=generator, device="cuda")
    keys = (draw((batch, heads, prompt, dim), projection, generator, torch.float32) * scale).to(dtype)
    values = torch.randn(keys.shape, generator=generator, device="cuda").to(dtype)
    query = torch.randn(batch, heads * group, prompt, dim, generator=generator, device="cuda").to(dtype)
    for cache in caches:
        cache.update(keys, values, 0)
        cache.layers[0].attend(query, None, 1.0)
    calls = {"n": 0}
    real = kernels.lshe_step

    def counting(*args, **kwargs):
        calls["n"] += 1
        assert kwargs.get("norms") is not None
        return real(*args, **kwargs)

    kernels.lshe_step = counting
    try:
        for step in range(25):
            q = draw((batch, heads * group, 1, dim), projection, generator, dtype)
            k = draw((batch, heads, 1, dim), projection, generator, dtype)
            v = torch.randn(k.shape, generator=generator, device="cuda").to(dtype)
            for cache in caches:
                cache.update(k, v, 0)
                cache.layers[0].attend(q, None, 1.0)
            fused, reference = caches[0].layers[0], caches[1].layers[0]
            assert torch.equal(fused.keys, reference.keys), step  # the same victims were overwritten
            assert torch.equal(fused.valid, reference.valid), step
            for name in ("codes", "norm"):
                assert torch.equal(fused.features[name], reference.features[name]), (step, name)
            assert torch.equal(fused.recent_slots, reference.recent_slots), step
    finally:
        kernels.lshe_step = real
    assert calls["n"] == 25


@gpu
def test_norm_aware_policy_fuses_where_plain_lshe_does():
    query = torch.zeros(1, 2, 1, 8, device="cuda")
    assert LSHEPolicy(proj_dim=16, norm_aware=True).fuses(query)
    assert not LSHEPolicy(proj_dim=64, norm_aware=True).fuses(query)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="with a GPU the compiled kernel itself is checked against the torch path (the tests above); "
    "the interpreter check is for machines without one",
)
def test_fused_step_under_the_triton_interpreter_equals_torch_path():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_kernel_interpreter.py")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.endswith(") True") for line in lines)  # every case of the script
