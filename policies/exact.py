"""The two exact limits of LSH-E's query probe: evict by the true angle, or by the true dot product.

LSH-E's Hamming distance between SimHash codes estimates the *angle* between the query and a key
(each of ``proj_dim`` bits differs with probability angle / pi), so as ``proj_dim`` grows LSH-E's
victims converge to `AnglePolicy`'s. Attention ranks keys by the *dot product* q . k = |q| |k| cos,
which also carries the key's norm: `DotPolicy` evicts the key with the smallest summed dot product.
Comparing LSH-E with both tells whether it loses for lack of bits (LSH-E < angle) or because the
angle is the wrong target (angle < dot).

Both probe with the current query and sum over the query heads of a GQA group, like
``LSHEPolicy(probe="query")`` (`policies.lshe.LSHEPolicy.distances`); at a window prefill they probe
with the last ``window`` queries of the prompt, padding probes counting for nothing. They store no
per-token features (they read the cached keys, which the cache holds anyway) and have no fused GPU
path: a reference, not a method to deploy. Scores are computed in float32.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView


def grouped_probe_sum(view: SlotView, per_pair: torch.Tensor) -> torch.Tensor:
    """Sum ``per_pair`` (B, Hq, Q, S), one value per (query head, probe, slot), over each KV head's
    query heads and over the real probes -> (B, H, S)."""
    batch, heads = view.valid.shape[:2]
    q_heads, probes, slots = per_pair.shape[1:]
    if view.probe_valid is not None:
        per_pair = per_pair * view.probe_valid[:, None, :, None].to(per_pair.dtype)
    return per_pair.reshape(batch, heads, (q_heads // heads) * probes, slots).sum(dim=2)


def _grouped_keys(view: SlotView) -> torch.Tensor:
    """(B, Hq, S, D) float32: each query head's KV head's cached keys."""
    group = view.queries.shape[1] // view.keys.shape[1]
    return view.keys.float().repeat_interleave(group, dim=1)


class AnglePolicy(EvictionPolicy):
    """Evict the key with the largest angle to the probe queries, summed over the GQA group (the
    limit of LSH-E's query probe as ``proj_dim`` grows)."""

    name: ClassVar[str] = "angle"

    def angles(self, view: SlotView) -> torch.Tensor:
        """(B, H, S) angle in radians between each slot's key and the probe queries, summed."""
        q = torch.nn.functional.normalize(view.queries.float(), dim=-1)
        k = torch.nn.functional.normalize(_grouped_keys(view), dim=-1)
        cos = (q @ k.transpose(-1, -2)).clamp(-1.0, 1.0)  # (B, Hq, Q, S)
        return grouped_probe_sum(view, torch.arccos(cos))

    def score(self, view: SlotView) -> torch.Tensor:
        return -self.angles(view)

    def explain(self, view: SlotView) -> dict[str, torch.Tensor]:
        return {"angle": self.angles(view)}


class DotPolicy(EvictionPolicy):
    """Evict the key with the smallest dot product with the probe queries, summed over the GQA group
    (the attention logit before scaling: what LSH-E would estimate if it knew the norms)."""

    name: ClassVar[str] = "dot"

    def score(self, view: SlotView) -> torch.Tensor:
        dots = view.queries.float() @ _grouped_keys(view).transpose(-1, -2)  # (B, Hq, Q, S)
        return grouped_probe_sum(view, dots)
