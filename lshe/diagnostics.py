"""Diagnostics of what eviction throws away, measured against a shadow full cache.

The paper's claim is that a small Hamming distance finds the tokens that get high attention.
``diag = EvictionDiagnostics(); cache = diag.cache(policy, **cache_kwargs)`` builds an
`EvictingCache` whose layers report into ``diag`` (one ``diag`` may build the caches of many batches;
``diag.summary()`` gives the means over all of them). Each such layer keeps every key the run produced (a shadow full cache, per layer) and, at every decode step, before
the victim is overwritten, compares what the policy did with the true full-cache attention of the
current query (softmax over all tokens seen, averaged over the query heads of each KV group):

* ``diag_lost_attention_mass``: the true attention mass on tokens no longer cached after this step's
  eviction (0 for the full cache);
* ``diag_evicted_attention_rank``: the victim's true attention rank among the cached tokens it
  could have been chosen from (not sink, not recent), normalised to [0, 1] (0 = the least attended
  candidate was evicted, 1 = the most attended);
* ``diag_score_logit_corr``: Pearson correlation, over cached slots, between the policy's keep
  score and the true attention logit (positive = the score ranks like attention);
* ``diag_<name>_logit_corr`` for every quantity the policy explains (`EvictionPolicy.explain`), e.g.
  ``diag_hamming_logit_corr`` for LSH-E: correlation between the Hamming distance to the probe and
  the true logit (the paper predicts negative).

Each is averaged over steps, layers, batch rows and KV heads. Diagnostics cost a full-cache attention
per step and the shadow's memory, and they turn off a policy's fused step (they need its scores);
they are for analysis runs, not for speed measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lshe.cache import EvictingCache
from lshe.layer import EvictingLayer
from policies.base import EvictionPolicy

NAMES = (
    "diag_lost_attention_mass",
    "diag_evicted_attention_rank",
    "diag_score_logit_corr",
    "diag_hamming_logit_corr",
)


def _pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Correlation along the last dim over masked entries; NaN where undefined. Shapes (..., S)."""
    n = mask.sum(-1).clamp(min=1)
    x = torch.where(mask, x, 0.0)
    y = torch.where(mask, y, 0.0)
    mx, my = x.sum(-1) / n, y.sum(-1) / n
    dx = torch.where(mask, x - mx[..., None], 0.0)
    dy = torch.where(mask, y - my[..., None], 0.0)
    denom = (dx.pow(2).sum(-1) * dy.pow(2).sum(-1)).sqrt()
    return (dx * dy).sum(-1) / denom  # 0 / 0 = NaN for constant inputs, dropped by the mean


class _LayerShadow:
    """All keys of one layer in token order (padded coordinates) and which token each slot holds."""

    def __init__(self, keys: torch.Tensor, real: torch.Tensor, slot_token: torch.Tensor) -> None:
        self.keys = keys  # (B, H, T, D)
        self.real = real  # (B, T) bool
        self.slot_token = slot_token  # (B, H, S) long, -1 = empty


class EvictionDiagnostics:
    """Accumulates the diagnostics of every decode step of the caches it built (`cache`)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def cache(self, policy: EvictionPolicy, **cache_kwargs) -> EvictingCache:
        """An `EvictingCache` (same arguments) whose decode steps report into this object."""
        return DiagnosedCache(self, policy, **cache_kwargs)

    # ---- results ------------------------------------------------------------------------------
    def add(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().float().flatten()
        values = values[~torch.isnan(values)]
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def summary(self) -> dict[str, float | None]:
        """Mean of each diagnostic over everything observed (None where nothing was observed)."""
        names = list(NAMES) + sorted(set(self.sums) - set(NAMES))
        return {
            name: (self.sums[name] / self.counts[name] if self.counts.get(name) else None) for name in names
        }

    def merge(self, other: EvictionDiagnostics) -> None:
        """Add another object's sums (e.g. one per batch, merged over a run)."""
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]


class DiagnosedCache(EvictingCache):
    """An `EvictingCache` whose layers report to an `EvictionDiagnostics` (built by its `cache`)."""

    def __init__(self, diagnostics: EvictionDiagnostics, policy: EvictionPolicy, **cache_kwargs) -> None:
        super().__init__(policy, **cache_kwargs)
        self.diagnostics = diagnostics

    def make_layer(self, layer_idx: int) -> EvictingLayer:
        return DiagnosedLayer(self.policy, self.settings, layer_idx, self.diagnostics)


class DiagnosedLayer(EvictingLayer):
    """A layer with a shadow full cache, comparing each step's eviction with the true attention."""

    allows_fast_path = False  # every step must show its scores

    def __init__(self, policy, settings, layer_idx: int, diagnostics: EvictionDiagnostics) -> None:
        super().__init__(policy, settings, layer_idx)
        self.diagnostics = diagnostics
        self.shadow: _LayerShadow | None = None
        self.scaling: float | None = None

    def on_prefill(self, key, value, index, positions) -> None:
        if self.window is not None or self.softcap is not None or self.sinks is not None:
            raise ValueError(
                f"EvictionDiagnostics compare with plain causal attention over every token; layer "
                f"{self.layer_idx} has sliding_window={self.window}, softcap={self.softcap}, attention "
                f"sinks={self.sinks is not None}, which the diagnostics do not model"
            )
        slot_token = torch.full(self.valid.shape, -1, dtype=torch.long, device=key.device)
        slot_token[:, :, : index.shape[2]] = index
        slot_token = torch.where(self.valid, slot_token, -1)
        self.shadow = _LayerShadow(key.detach().clone(), positions >= 0, slot_token)

    def move_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().move_rows(rows)
        if self.shadow is not None:
            shadow = self.shadow
            shadow.keys, shadow.real, shadow.slot_token = (
                rows(shadow.keys),
                rows(shadow.real),
                rows(shadow.slot_token),
            )

    def decode_step(self, query, key, value, scaling) -> torch.Tensor:
        self.scaling = scaling  # the model's own logit scale (Gemma's is not 1/sqrt(head_dim))
        return super().decode_step(query, key, value, scaling)

    def on_write(self, query, key, value, new_features, slot, score) -> None:
        diag, shadow = self.diagnostics, self.shadow
        batch, heads, slots = self.valid.shape
        if shadow.slot_token.shape[2] < slots:  # a non-evicting cache grew its storage
            grow = slots - shadow.slot_token.shape[2]
            shadow.slot_token = torch.nn.functional.pad(shadow.slot_token, (0, grow), value=-1)
        group = query.shape[1] // heads
        new_token = shadow.keys.shape[2]
        all_keys = torch.cat([shadow.keys, key], dim=2)  # (B, H, T + 1, D)
        real = torch.cat([shadow.real, torch.ones(batch, 1, dtype=torch.bool, device=key.device)], dim=1)

        # True full-cache attention of this query, averaged over each group's query heads.
        q = query.reshape(batch, heads, group, query.shape[-1]).float()
        scale = self.scaling if self.scaling is not None else 1 / math.sqrt(query.shape[-1])
        logits = torch.einsum("bhgd,bhtd->bhgt", q, all_keys.float()) * scale
        logits = logits.masked_fill(~real[:, None, None, :], -math.inf)
        probs = torch.softmax(logits, dim=-1).mean(dim=2)  # (B, H, T + 1)
        logits = logits.mean(dim=2)

        before = torch.where(self.valid, shadow.slot_token, -1)  # tokens cached before the write
        victim = before.gather(2, slot)  # (B, H, 1), -1 when an empty slot was used
        after = before.scatter(2, slot, new_token)
        cached_after = torch.zeros(batch, heads, new_token + 2, dtype=torch.bool, device=key.device)
        cached_after.scatter_(2, torch.where(after >= 0, after, new_token + 1), True)
        lost = (probs * (real[:, None, :] & ~cached_after[..., : new_token + 1])).sum(-1)
        diag.add("diag_lost_attention_mass", lost)

        evicted = victim[..., 0] >= 0
        if bool(evicted.any()):
            candidates = self.valid & ~self.protected()  # what the policy could choose from
            cached_probs = probs.gather(2, before.clamp(min=0))  # (B, H, S)
            victim_prob = probs.gather(2, victim.clamp(min=0))
            below = ((cached_probs < victim_prob) & candidates).sum(-1).float()
            rank = below / (candidates.sum(-1).float() - 1).clamp(min=1)
            diag.add("diag_evicted_attention_rank", rank[evicted])

        if score is not None:
            slot_logits = logits.gather(2, before.clamp(min=0))
            diag.add("diag_score_logit_corr", _pearson(score.float(), slot_logits, self.valid))
            for name, quantity in self.policy.explain(self.slot_view(query, key, new_features)).items():
                diag.add(f"diag_{name}_logit_corr", _pearson(quantity.float(), slot_logits, self.valid))

        shadow.keys = all_keys
        shadow.real = real
        shadow.slot_token = torch.where(self.valid, shadow.slot_token, -1).scatter(2, slot, new_token)
