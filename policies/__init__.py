"""Eviction policies: the `EvictionPolicy` interface and one module per policy.

`POLICIES` maps each built-in name to its class; `make_policy(name, **kwargs)` builds one.
Configs instantiate classes directly through ``_target_`` (``conf/policy/*.yaml``), so a policy that
lives outside this package needs no registration.
"""

from __future__ import annotations

from policies.base import EvictionPolicy, SlotView
from policies.exact import AnglePolicy, DotPolicy
from policies.full import FullPolicy
from policies.h2o import H2OPolicy
from policies.knorm import KNormPolicy
from policies.lshe import LSHEPolicy
from policies.random import RandomPolicy
from policies.streaming import StreamingPolicy
from policies.tova import TOVAPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (
        FullPolicy,
        LSHEPolicy,
        H2OPolicy,
        TOVAPolicy,
        RandomPolicy,
        StreamingPolicy,
        KNormPolicy,
        AnglePolicy,
        DotPolicy,
    )
}


def make_policy(name: str, **kwargs) -> EvictionPolicy:
    """Build a built-in policy by name; unknown names raise a ValueError listing the choices."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](**kwargs)


__all__ = ["EvictionPolicy", "SlotView", "POLICIES", "make_policy"]
