"""H2O (heavy hitters): keep the tokens with the largest attention accumulated over all steps.

Attention at prefill is summed over all prompt queries; at each decode step the new attention is
added. Eviction happens before attention, so step t evicts with the attention of steps < t.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView


class H2OPolicy(EvictionPolicy):
    name: ClassVar[str] = "h2o"
    needs_attention: ClassVar[bool] = True

    def token_features(self, layer_idx, keys, positions):
        return {"acc": torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)}

    def observe_attention(self, layer_idx, features, attention_sum, attention_last):
        features["acc"].add_(attention_sum)

    def score(self, view: SlotView) -> torch.Tensor:
        return view.features["acc"]
