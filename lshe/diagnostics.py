"""Diagnostics of what eviction throws away, measured against a shadow full cache.

The paper's claim is that a small Hamming distance finds the tokens that get high attention. An
`EvictionDiagnostics` observer, attached to an `EvictingCache` (``cache.observer = diagnostics``),
keeps every key the run produced (a shadow full cache, per layer) and, at every decode step, before
the victim is overwritten, compares what the policy did with the true full-cache attention of the
current query (softmax over all tokens seen, averaged over the query heads of each KV group):

* ``diag_lost_attention_mass``: the true attention mass on tokens no longer cached after this step's
  eviction (0 for the full cache);
* ``diag_evicted_attention_rank``: the victim's true attention rank among the cached tokens it
  could have been chosen from (not sink, not recent), normalised to [0, 1] (0 = the least attended
  candidate was evicted, 1 = the most attended);
* ``diag_score_logit_corr``: Pearson correlation, over cached slots, between the policy's keep
  score and the true attention logit (positive = the score ranks like attention);
* ``diag_hamming_logit_corr`` (LSH-E only): correlation between the Hamming distance to the probe
  and the true logit (the paper predicts negative).

Each is averaged over steps, layers, batch rows and KV heads. Diagnostics cost a full-cache attention
per step and the shadow's memory; they are for analysis runs, not for speed measurements.
"""

from __future__ import annotations

import math

import torch

from policies.lshe import LSHEPolicy


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
    """Observer for `EvictingCache`: accumulates the diagnostics of every decode step."""

    def __init__(self) -> None:
        self.shadows: dict[int, _LayerShadow] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    # ---- hooks called by the cache ------------------------------------------------------------
    def on_prefill(self, layer, key, value, index, positions) -> None:
        slot_token = torch.full(layer.valid.shape, -1, dtype=torch.long, device=key.device)
        slot_token[:, :, : index.shape[2]] = index
        slot_token = torch.where(layer.valid, slot_token, -1)
        self.shadows[layer.layer_idx] = _LayerShadow(key.detach().clone(), positions >= 0, slot_token)

    def on_decode(self, layer, query, key, value, new_features, slot, score) -> None:
        shadow = self.shadows[layer.layer_idx]
        batch, heads, slots = layer.valid.shape
        if shadow.slot_token.shape[2] < slots:  # a non-evicting cache grew its storage
            grow = slots - shadow.slot_token.shape[2]
            shadow.slot_token = torch.nn.functional.pad(shadow.slot_token, (0, grow), value=-1)
        group = query.shape[1] // heads
        new_token = shadow.keys.shape[2]
        all_keys = torch.cat([shadow.keys, key], dim=2)  # (B, H, T + 1, D)
        real = torch.cat([shadow.real, torch.ones(batch, 1, dtype=torch.bool, device=key.device)], dim=1)

        # True full-cache attention of this query, averaged over each group's query heads.
        q = query.reshape(batch, heads, group, query.shape[-1]).float()
        logits = torch.einsum("bhgd,bhtd->bhgt", q, all_keys.float()) / math.sqrt(query.shape[-1])
        logits = logits.masked_fill(~real[:, None, None, :], -math.inf)
        probs = torch.softmax(logits, dim=-1).mean(dim=2)  # (B, H, T + 1)
        logits = logits.mean(dim=2)

        before = torch.where(layer.valid, shadow.slot_token, -1)  # tokens cached before the write
        victim = before.gather(2, slot)  # (B, H, 1), -1 when an empty slot was used
        after = before.scatter(2, slot, new_token)
        cached_after = torch.zeros(batch, heads, new_token + 2, dtype=torch.bool, device=key.device)
        cached_after.scatter_(2, torch.where(after >= 0, after, new_token + 1), True)
        lost = (probs * (real[:, None, :] & ~cached_after[..., : new_token + 1])).sum(-1)
        self._add("diag_lost_attention_mass", lost)

        evicted = victim[..., 0] >= 0
        if bool(evicted.any()):
            candidates = layer.valid & ~layer._protected()  # what the policy could choose from
            cached_probs = probs.gather(2, before.clamp(min=0))  # (B, H, S)
            victim_prob = probs.gather(2, victim.clamp(min=0))
            below = ((cached_probs < victim_prob) & candidates).sum(-1).float()
            rank = below / (candidates.sum(-1).float() - 1).clamp(min=1)
            self._add("diag_evicted_attention_rank", rank[evicted])

        if score is not None:
            slot_logits = logits.gather(2, before.clamp(min=0))
            self._add("diag_score_logit_corr", _pearson(score.float(), slot_logits, layer.valid))
            if isinstance(layer.policy, LSHEPolicy):
                distance = layer.policy.distances(layer.slot_view(query, key, new_features)).float()
                self._add("diag_hamming_logit_corr", _pearson(distance, slot_logits, layer.valid))

        shadow.keys = all_keys
        shadow.real = real
        shadow.slot_token = torch.where(layer.valid, shadow.slot_token, -1).scatter(2, slot, new_token)

    # ---- results ------------------------------------------------------------------------------
    def _add(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().float().flatten()
        values = values[~torch.isnan(values)]
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def summary(self) -> dict[str, float | None]:
        """Mean of each diagnostic over everything observed (None where nothing was observed)."""
        names = (
            "diag_lost_attention_mass",
            "diag_evicted_attention_rank",
            "diag_score_logit_corr",
            "diag_hamming_logit_corr",
        )
        return {
            name: (self.sums[name] / self.counts[name] if self.counts.get(name) else None) for name in names
        }

    def merge(self, other: EvictionDiagnostics) -> None:
        """Add another observer's sums (one observer per batch, merged over a run)."""
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]
