"""Random eviction (seeded): a floor every informed policy should beat.

Each slot's score is a hash of what identifies the decision: (seed, layer, KV head, the position of
the token being added, the position of the slot's token). So a row's choices never depend on how rows
are batched, on the device, or on the order of calls; no generator is drawn from (a decode step
makes no host synchronisation and a CUDA graph replays it as is).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView, StoredScore

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64 (arithmetic wraps)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser of ``x + golden ratio`` on int64 tensors, wrapping like uint64."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def hash_scores(
    seed: int, layer_idx: int, heads: torch.Tensor, current: torch.Tensor, cached: torch.Tensor
) -> torch.Tensor:
    """float32 scores in [0, 1) (24 random bits each) of a chain of splitmix64 over the identifiers.

    Args:
        heads: KV head indices, broadcastable to ``cached``; current: positions of the tokens being
            added, broadcastable; cached: (B, H, S) positions of the slots' tokens. int64.
    """
    h = splitmix64(torch.full((), seed, dtype=torch.int64, device=cached.device))
    for part in (layer_idx, heads, current, cached):
        h = splitmix64(h ^ part)
    return _shift_right(h, 40).float() / float(1 << 24)


@functools.cache
def hash_base(seed: int, layer_idx: int) -> int:
    """The first two links of `hash_scores`'s chain, splitmix64(splitmix64(seed) ^ layer), as an
    unsigned 64-bit integer: the victim kernel continues the chain with the KV head and the positions
    (`lshe.victim_kernel.FeatureScore`). Cached: computed once per (seed, layer), not per step."""
    h = splitmix64(torch.full((), seed, dtype=torch.int64))
    return int(splitmix64(h ^ layer_idx)) & ((1 << 64) - 1)


@functools.cache
def compiled_hash_scores():
    """`hash_scores` through `torch.compile` (used on CUDA): one generated kernel instead of ~45 small
    ones per layer and step (4 splitmix64 rounds of int64 ops), which at batch 1 cost more in launches
    than the hash computes. Integer arithmetic only, so exactly the eager scores
    (`tests/test_policies.py`); ``dynamic=True``: one graph for every layer, seed and shape."""
    return torch.compile(hash_scores, dynamic=True)


class RandomPolicy(EvictionPolicy):
    """Uniform random keep-scores, a pure function of (seed, layer, KV head, positions)."""

    name: ClassVar[str] = "random"

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [-2**63, 2**63) (an int64), got {seed!r}")
        self.seed = seed

    def token_features(self, layer_idx, keys, positions):
        return {"position": positions[:, None, :].expand(keys.shape[:3]).to(torch.int64)}

    def score(self, view: SlotView) -> torch.Tensor:
        cached = view.features["position"]  # (B, H, S)
        current = view.new_features["position"][:, :, -1:]  # (B, H, 1): the newest probe token
        heads = torch.arange(cached.shape[1], device=cached.device)[None, :, None]
        hashed = compiled_hash_scores() if cached.is_cuda else hash_scores
        return hashed(self.seed, view.layer_idx, heads, current, cached)

    def stored_score(self) -> StoredScore:
        return StoredScore("position", hash_seed=self.seed)

    def describe(self) -> dict:
        return {"policy": self.name, "seed": self.seed}
