"""The evicting cache's settings, checked once, and the per-row slot capacity they imply.

`CacheSettings` is what every layer of an `lshe.cache.EvictingCache` is given (plain values, no
reference back to the cache). `row_capacity` turns the budget into slots per batch row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFILL_STRATEGIES = ("streaming", "window", "sequential")


def validate_budget(budget: float | int) -> float | int:
    """Return the budget as an int (slots) or float fraction, or raise a ValueError naming ``budget``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(
            f"budget must be a fraction in (0, 1] or an integer number of slots > 1, got {budget!r}"
        )
    if isinstance(budget, int) and budget > 1:
        return budget
    if float(budget) == 1.0:
        return 1.0
    if isinstance(budget, float) and 0.0 < budget < 1.0:
        return budget
    raise ValueError(f"budget must be a fraction in (0, 1] or an integer number of slots > 1, got {budget!r}")


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class CacheSettings:
    """What every layer of one cache needs to know (see `lshe.cache.EvictingCache` for the meaning).

    ``budget`` is normalised by `validate_budget` (an int > 1 is slots, a float in (0, 1] a fraction).
    """

    budget: float | int = 1.0
    sink: int = 4
    recent: int = 10
    prefill: str = "window"
    window: int = 32
    max_new_tokens: int | None = None
    fused: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", validate_budget(self.budget))
        _check_int("sink", self.sink, 0)
        _check_int("recent", self.recent, 0)
        if self.prefill not in PREFILL_STRATEGIES:
            raise ValueError(f"prefill must be one of {list(PREFILL_STRATEGIES)}, got {self.prefill!r}")
        _check_int("window", self.window, 1)
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, 0)
        object.__setattr__(self, "fused", bool(self.fused))

    def check_for(self, evicts: bool) -> None:
        """Refuse budgets that cannot work for a policy that evicts (``evicts``) or not."""
        if not evicts:
            return
        if isinstance(self.budget, int) and self.budget <= self.sink + self.recent:
            raise ValueError(
                f"budget ({self.budget} slots) must be larger than sink + recent = {self.sink + self.recent}"
            )
        if isinstance(self.budget, float) and self.budget < 1.0 and self.max_new_tokens is None:
            raise ValueError(
                f"budget={self.budget} is a fraction of prompt + max_new_tokens: pass max_new_tokens"
            )


def row_capacity(settings: CacheSettings, evicts: bool, real_lengths: torch.Tensor) -> torch.Tensor:
    """(B,) slots each row may fill, from its real prompt length (B,) (prompt without padding).

    A non-evicting policy may fill prompt + ``max_new_tokens``; an int budget is that many slots; a
    fraction is of prompt + ``max_new_tokens``, rounded up, and must leave room beyond sink + recent.
    """
    future = settings.max_new_tokens or 0
    if not evicts:
        return real_lengths + future
    if isinstance(settings.budget, int):
        return torch.full_like(real_lengths, settings.budget)
    capacity = torch.ceil(settings.budget * (real_lengths + future).double()).long()
    smallest = int(capacity.min())
    floor = settings.sink + settings.recent
    if smallest <= floor:
        raise ValueError(
            f"budget={settings.budget} gives {smallest} slots for the shortest sequence; it must be "
            f"larger than sink + recent = {floor} (raise budget or lower sink/recent)"
        )
    return capacity
