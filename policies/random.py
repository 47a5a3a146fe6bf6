"""Random eviction (seeded): a floor every informed policy should beat."""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, SlotView


class RandomPolicy(EvictionPolicy):
    """Uniform random scores from one seeded generator per device.

    The numbers are drawn on the device of the cache, so a decode step makes no host-to-device copy
    (no synchronisation) and can be captured in a CUDA graph (`lshe.fast_decode` registers these
    generators with the graph). CPU and GPU generators give different streams for the same seed.
    """

    name: ClassVar[str] = "random"
    deterministic: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``, created and seeded on first use."""
        device = torch.device(device)
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def reset(self) -> None:
        for generator in self.generators.values():
            generator.manual_seed(self.seed)

    def score(self, view: SlotView) -> torch.Tensor:
        device = view.valid.device
        return torch.rand(view.valid.shape, generator=self.generator(device), device=device)

    def describe(self) -> dict:
        return {"policy": self.name, "seed": self.seed}
