"""K-norm (arXiv 2406.11430): keep low-L2-norm keys, which tend to draw high attention."""

from __future__ import annotations

from typing import ClassVar

import torch

from lshe.kernels import key_norms
from policies.base import EvictionPolicy, SlotView, StoredScore


class KNormPolicy(EvictionPolicy):
    name: ClassVar[str] = "knorm"

    def token_features(self, layer_idx, keys, positions):
        return {"norm": key_norms(keys)}

    def score(self, view: SlotView) -> torch.Tensor:
        return -view.features["norm"]

    def stored_score(self) -> StoredScore:
        return StoredScore("norm", sign=-1.0)
