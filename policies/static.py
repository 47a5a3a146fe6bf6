"""The benchmark's static control: round-robin writes, no scoring, no protection, no features.

Not an eviction policy to study (it is not in ``conf/policy``): it stands for a fixed-size static
cache beside an evicting policy with the same slots, so that ``step / control step`` isolates what
choosing victims costs. Each decode step writes the new token at slot ``position mod slots`` and
attends like every fused-SDPA policy. Use it with ``prefill="streaming"`` and prompts that fill the
budget (then every slot is valid and attention needs no mask); with room left, a step marks its slot
valid, and attention stays masked for the whole run.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from policies.base import EvictionPolicy, LayerState, SlotView


class StaticControl(EvictionPolicy):
    name: ClassVar[str] = "static"
    needs_own_step: ClassVar[bool] = True  # round-robin whatever the cache's `fused` setting
    fills_empty_first: ClassVar[bool] = False  # round-robin may skip empty slots
    fused_step_in_range: ClassVar[bool] = True  # position mod slots

    def fused_step(self, layer: LayerState, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        batch, heads, slots = layer.valid.shape
        slot = (layer.next_position % slots)[:, None, None].expand(batch, heads, 1)
        if not layer.all_valid:
            layer.valid.scatter_(2, slot, True)
        return slot

    def score(self, view: SlotView) -> torch.Tensor:
        raise ValueError(
            "the static control does not score slots: use it with prefill='streaming' and without diagnostics"
        )
