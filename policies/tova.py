"""TOVA: keep the tokens with the largest attention from the most recent query.

Eviction happens before attention, so step t evicts with the attention of step t - 1's query.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView


class TOVAPolicy(EvictionPolicy):
    name: ClassVar[str] = "tova"
    needs_attention: ClassVar[bool] = True

    def token_features(self, layer_idx, keys, positions):
        return {"last": torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)}

    def observe_attention(self, layer_idx, features, attention_sum, attention_last):
        features["last"].copy_(attention_last)

    def score(self, view: SlotView) -> torch.Tensor:
        return view.features["last"]
