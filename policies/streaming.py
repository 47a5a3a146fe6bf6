"""StreamingLLM: keep the attention sinks and the most recent tokens, i.e. evict the oldest."""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView, StoredScore


class StreamingPolicy(EvictionPolicy):
    name: ClassVar[str] = "streaming"

    def token_features(self, layer_idx, keys, positions):
        return {"position": positions[:, None, :].expand(keys.shape[:3]).int()}

    def score(self, view: SlotView) -> torch.Tensor:
        return view.features["position"].float()

    def stored_score(self) -> StoredScore:
        return StoredScore("position")
