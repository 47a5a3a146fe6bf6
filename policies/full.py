"""The full cache: nothing is evicted (the reference every compressed score is compared with)."""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView


class FullPolicy(EvictionPolicy):
    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False

    def score(self, view: SlotView) -> torch.Tensor:
        return torch.zeros(view.valid.shape, device=view.valid.device)
