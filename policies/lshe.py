"""LSH-E: evict the cached token whose key is most cosine-dissimilar to the probe, by SimHash.

Each key gets a ``proj_dim``-bit SimHash code (packed, ``ceil(proj_dim / 8)`` bytes per token and KV
head) when it enters the cache, from a seeded Gaussian projection per layer shared by its heads. At
each step the probe is hashed and the Hamming distance to every cached code estimates the angle
between them; the slot with the largest distance goes first. No attention weights are used.

``probe="query"`` (the paper) hashes the current query; with GQA the distances of the query heads of
a group are summed. ``probe="key"`` (the authors' code) hashes the current token's new key.
``score_decay`` > 0 accumulates distances across steps, ``acc = decay * acc + distance`` (0 is the
paper's greedy single-step rule).

``norm_aware=True`` also stores each key's L2 norm (float16, 2 bytes per token and KV head, counted in
the cache's feature bytes) and scores a slot by the dot product estimated from both,
``norm * cos(pi * hamming / proj_dim)`` summed over the probes (the group's query heads): higher =
keep. It estimates q . k up to the query's norm, which it ignores (a group's query heads count
alike); its exact target is `policies.exact.DotPolicy`, the plain variant's `policies.exact.AnglePolicy`.

On CUDA a decode step runs as one fused Triton kernel (`fused_step`, `lshe.kernels.lshe_step`) when
``score_decay == 0`` and ``proj_dim <= 32`` (norm-aware too); it chooses the torch path's victims. On
CPU tensors plain greedy LSH-E (not norm-aware) takes `lshe.victims.lshe_torch_step`: the same victims
in a third of the torch operations (the CPU eviction overhead target).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lshe import kernels, victims
from lshe.hashing import gaussian_projection, hamming, simhash
from policies.base import EvictionPolicy, LayerState, SlotView

PROBES = ("query", "key")


def cos_table(proj_dim: int, device: torch.device) -> torch.Tensor:
    """(proj_dim + 1,) float32: cos(pi * h / proj_dim) for every Hamming distance h (shared with the
    fused kernel, so both paths use the same rounded values)."""
    return torch.cos(torch.arange(proj_dim + 1, device=device, dtype=torch.float32) * (torch.pi / proj_dim))


class LSHEPolicy(EvictionPolicy):
    name: ClassVar[str] = "lshe"
    fused_step_in_range: ClassVar[bool] = True  # the victim of a scan over the slots

    def __init__(
        self,
        proj_dim: int = 16,
        probe: str = "query",
        score_decay: float = 0.0,
        seed: int = 0,
        norm_aware: bool = False,
    ) -> None:
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
            raise ValueError(f"proj_dim must be an integer >= 1, got {proj_dim!r}")
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {list(PROBES)}, got {probe!r}")
        if (
            not isinstance(score_decay, (int, float))
            or isinstance(score_decay, bool)
            or not 0.0 <= score_decay < 1.0
        ):
            raise ValueError(f"score_decay must be a number in [0, 1), got {score_decay!r}")
        if not isinstance(norm_aware, bool):
            raise ValueError(f"norm_aware must be true or false, got {norm_aware!r}")
        if norm_aware and score_decay > 0:
            raise ValueError(f"norm_aware=true needs score_decay=0 (greedy scores), got {score_decay!r}")
        self.proj_dim, self.probe, self.score_decay, self.seed = proj_dim, probe, float(score_decay), seed
        self.norm_aware = norm_aware
        self._projections: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._cos_tables: dict[torch.device, torch.Tensor] = {}

    def projection(self, layer_idx: int, head_dim: int, device: torch.device) -> torch.Tensor:
        """This layer's (head_dim, proj_dim) float32 projection on ``device``, created once."""
        key = (layer_idx, head_dim, device)
        if key not in self._projections:
            self._projections[key] = gaussian_projection(head_dim, self.proj_dim, self.seed, layer_idx).to(
                device
            )
        return self._projections[key]

    def cos_table(self, device: torch.device) -> torch.Tensor:
        """`cos_table` for this proj_dim on ``device``, created once."""
        if device not in self._cos_tables:
            self._cos_tables[device] = cos_table(self.proj_dim, device)
        return self._cos_tables[device]

    def token_features(self, layer_idx, keys, positions):
        codes = simhash(keys, self.projection(layer_idx, keys.shape[-1], keys.device))
        features = {"codes": codes}
        if self.norm_aware:
            features["norm"] = kernels.key_norms(keys).half()
        if self.score_decay > 0:
            features["acc"] = torch.zeros(codes.shape[:3], dtype=torch.float32, device=keys.device)
        return features

    def distances(self, view: SlotView, per_probe: bool = False) -> torch.Tensor:
        """(B, H, S) Hamming distance of every slot's code to the probe codes, summed over probes
        (``per_probe``: (B, H, P, S), padding probes of a window prefill zeroed)."""
        batch, heads = view.valid.shape[:2]
        if self.probe == "query":
            projection = self.projection(view.layer_idx, view.queries.shape[-1], view.queries.device)
            probe = simhash(view.queries, projection)  # (B, Hq, Q, n_bytes)
            probe = probe.reshape(batch, heads, -1, probe.shape[-1])  # query heads of a group together
        else:
            probe = view.new_features["codes"]  # (B, H, Q, n_bytes)
        distance = hamming(probe[:, :, :, None, :], view.features["codes"][:, :, None, :, :])  # (B, H, P, S)
        if view.probe_valid is not None:  # padding probes of a window prefill count for nothing
            real = view.probe_valid[:, None, None, :].expand(
                batch, 1, probe.shape[2] // view.probe_valid.shape[1], -1
            )
            distance = distance * real.reshape(batch, 1, -1, 1)
        return distance if per_probe else distance.sum(dim=2)

    def estimated_dots(self, view: SlotView) -> torch.Tensor:
        """(B, H, S) norm-aware score: sum over probes of norm * cos(pi * hamming / proj_dim)."""
        distance = self.distances(view, per_probe=True).long()  # (B, H, P, S)
        cos = self.cos_table(distance.device)[distance]
        if view.probe_valid is not None:  # a padding probe adds nothing (its zeroed distance gives cos 1)
            batch, probes = view.probe_valid.shape[0], distance.shape[2]
            real = view.probe_valid[:, None, None, :].expand(
                batch, 1, probes // view.probe_valid.shape[1], -1
            )
            cos = cos * real.reshape(batch, 1, -1, 1)
        total = cos[:, :, 0]
        for probe in range(1, cos.shape[2]):  # left to right, as the fused kernel sums (same rounding)
            total = total + cos[:, :, probe]
        return view.features["norm"].float() * total

    def score(self, view: SlotView) -> torch.Tensor:
        if self.norm_aware:
            return self.estimated_dots(view)
        distance = self.distances(view).float()
        if self.score_decay > 0:
            acc = view.features["acc"]
            acc.mul_(self.score_decay).add_(distance)
            return -acc
        return -distance

    def explain(self, view: SlotView) -> dict[str, torch.Tensor]:
        out = {"hamming": self.distances(view).float()}
        if self.norm_aware:
            out["estimated_dot"] = self.estimated_dots(view)
        return out

    def fuses(self, query: torch.Tensor) -> bool:
        """Whether `fused_step` runs the Triton kernel for this query (else the torch path runs).

        Only this class: a subclass may change what the kernel hard-codes (scores, features), so it
        takes the torch path unless it overrides `fused_step` itself.
        """
        return (
            kernels.triton is not None
            and query.is_cuda
            and type(self) is LSHEPolicy
            and self.score_decay == 0
            and self.proj_dim <= kernels.MAX_BITS
        )

    def fused_step(self, layer: LayerState, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """Choose, hash and record this step's slots in one Triton launch (`lshe.kernels.lshe_step`);
        on CPU tensors plain greedy LSH-E takes `lshe.victims.lshe_torch_step`, the same victims in a
        third of the torch path's operations. Anything else: None (the generic path)."""
        if not self.fuses(query):
            plain = type(self) is LSHEPolicy and self.score_decay == 0 and not self.norm_aware
            if not plain or query.device.type != "cpu":
                return None
            return victims.lshe_torch_step(
                query,
                key,
                self.projection(layer.layer_idx, query.shape[-1], query.device),
                layer.features["codes"],
                layer.valid,
                victims.unusable_mask(layer),
                layer.recent_slots,
                layer.sink,
                layer.all_valid,
                probe_query=self.probe == "query",
            )
        return kernels.lshe_step(
            query,
            key,
            self.projection(layer.layer_idx, query.shape[-1], query.device),
            layer.features["codes"],
            layer.valid,
            layer.usable,
            layer.recent_slots,
            layer.sink,
            probe_query=self.probe == "query",
            norms=layer.features["norm"] if self.norm_aware else None,
            cos_table=self.cos_table(query.device) if self.norm_aware else None,
        )

    def describe(self) -> dict:
        return {
            "policy": self.name,
            "proj_dim": self.proj_dim,
            "probe": self.probe,
            "score_decay": self.score_decay,
            "norm_aware": self.norm_aware,
        }
