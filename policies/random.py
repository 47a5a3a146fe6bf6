"""Random eviction (seeded): a floor every informed policy should beat."""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView


class RandomPolicy(EvictionPolicy):
    name: ClassVar[str] = "random"
    deterministic: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def score(self, view: SlotView) -> torch.Tensor:
        return torch.rand(view.valid.shape, generator=self.generator).to(view.valid.device)

    def describe(self) -> dict:
        return {"policy": self.name, "seed": self.seed}
