"""The `EvictionPolicy` interface: what a policy sees, what it returns, what it owns.

A policy answers one question per layer and step: *how much is each cached slot worth keeping?*
It returns one score per (batch row, KV head, slot); higher means keep. Everything else lives once,
in `lshe.cache.EvictingCache`: the fixed slot storage, the budget, the protection of the first `sink`
and the `recent` most recent tokens, the use of empty slots first, padding, the choice of the victim
(the lowest-scoring unprotected slot, ties to the lowest slot index) and the overwrite itself.

What a policy sees (a `SlotView`, one per layer and step):

* at **decode**, before attention is computed: the cached keys/values of this layer, which slots are
  valid, the slot-aligned features the policy created for them, the current query (post-RoPE, all
  query heads) and the new token's key;
* at **prefill** with ``prefill="window"``: the prompt's keys as the "slots", and the last ``window``
  queries (and keys) of the prompt as the probe.

What a policy owns:

* **per-token features** (`token_features`): tensors computed once when a token enters the cache,
  shaped ``(batch, kv_heads, tokens, ...)``, e.g. LSH-E's packed hash codes or a key norm. The cache
  stores them slot-aligned beside the keys and moves them with every overwrite and compaction, so a
  policy never does slot bookkeeping. A policy may update its features in place in `score` or
  `observe_attention` (accumulated scores).
* any **per-layer constants** it needs (LSH-E's projection matrices), created lazily and seeded.

Attention weights are computed only for policies that set ``needs_attention = True``; the cache then
computes attention with an explicit softmax (never materialising more than one query chunk at a time)
and calls `observe_attention` after attention of every step. All other policies run on fused SDPA.
Because eviction happens *before* attention at each step, an attention-based policy scores slots with
the attention of the steps before the current one.

Per-row state lives in features: generate modes that reorder or select batch rows (beam search,
``num_return_sequences``) move every feature with its row; state kept elsewhere would not follow.

Optional hooks (defaults do nothing):

* `fused_step` -- a policy's own decode step, e.g. one fused GPU kernel (LSH-E's Triton kernel). The
  layer calls it before the generic path when the cache's ``fused`` setting is on (or the policy
  sets ``needs_own_step``) and no diagnostics are attached. It gets the layer's `LayerState` and
  either returns the (B, H, 1) int64 slots to overwrite, having marked them valid and updated its
  features and the recent list itself (the layer then writes keys and values and attends), or
  returns None, having changed nothing, to take the generic path. Its victims should be the generic
  path's; it must fill empty usable slots first unless ``fills_empty_first = False``.
* `stored_score` -- declares that `score` is one stored per-slot feature, signed (knorm, streaming)
  or hashed with the positions (random), so that on a GPU the victim kernel computes it while it
  scans the slots and writes the new token's value of that feature itself: no (B, H, S) score tensor
  is built, read back and thrown away at every layer and step. It must describe `score` exactly
  (`tests/test_victim_kernel.py` compares both paths' victims and state), and is used only when the
  class that defines it also defines `score` (`stored_score_in_use`).
* `explain` -- extra per-slot quantities behind the score, for `lshe.diagnostics` to correlate
  with the true attention logits (LSH-E: the Hamming distances).

Writing a new policy: subclass, set ``name``, implement `score` (and `token_features` if you need
per-token state). See ``policies/knorm.py`` for a complete example in a dozen lines.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch


@dataclass
class SlotView:
    """What a policy may look at for one layer at one step.

    Shapes: B batch rows, H KV heads, Hq query heads (Hq = H * group), S slots, D head dim, Q probe
    tokens (1 at decode; up to ``window`` at a window prefill).
    """

    layer_idx: int
    keys: torch.Tensor  # (B, H, S, D) cached keys, post-RoPE
    values: torch.Tensor  # (B, H, S, D)
    valid: torch.Tensor  # (B, H, S) bool: slot holds a real token
    features: dict[str, torch.Tensor]  # slot-aligned per-token features, each (B, H, S, ...)
    queries: torch.Tensor  # (B, Hq, Q, D) probe queries, post-RoPE
    new_keys: torch.Tensor  # (B, H, Q, D) keys of the probe tokens, post-RoPE
    new_features: dict[str, torch.Tensor] = field(default_factory=dict)  # features of the probe tokens
    probe_valid: torch.Tensor | None = None  # (B, Q) bool at a window prefill: probe is a real token


@dataclass(frozen=True)
class StoredScore:
    """A keep-score read from one stored (B, H, S) feature (see `EvictionPolicy.stored_score`).

    ``sign * features[feature]`` in float32 (``sign`` is 1 or -1, so the product is exact), or with
    ``hash_seed`` set, `policies.random.hash_scores` (seed, layer, KV head, the new token's position,
    the feature as the slot's token position): integer arithmetic, exact on every device.
    """

    feature: str
    sign: float = 1.0
    hash_seed: int | None = None

    def __post_init__(self) -> None:
        if self.sign not in (1.0, -1.0):
            raise ValueError(f"StoredScore.sign must be 1.0 or -1.0, got {self.sign!r}")


def stored_score_in_use(policy: EvictionPolicy) -> StoredScore | None:
    """``policy.stored_score()`` when the class that defines `score` also defines `stored_score`, else
    None. A subclass that overrides `score` alone (say, knorm keeping high norms instead) would
    otherwise inherit a declaration of its parent's score, and its GPU path would silently evict by
    the parent's rule; it takes the generic path instead (same victims as its CPU path)."""

    return policy.stored_score() if _defines_score_and_stored_score(type(policy)) else None


@functools.cache
def _defines_score_and_stored_score(cls: type) -> bool:
    """The first class in ``cls``'s MRO that defines `score` also defines `stored_score` (once per class:
    the layer asks at every decode step)."""

    def definer(name: str) -> type:
        return next(c for c in cls.__mro__ if name in c.__dict__)

    return definer("score") is definer("stored_score")


def fused_step_in_range(policy: EvictionPolicy) -> bool:
    """Whether ``policy.fused_step``'s slots lie in [0, S) by construction: the class that defines
    `fused_step` sets ``fused_step_in_range = True`` itself (a subclass that overrides `fused_step`
    does not inherit its parent's word). Then the layer lets the attention launch write the slot,
    unchecked; else `lshe.kernels.write_kv` writes it and fails loudly on a slot out of range."""
    return _declares_in_range(type(policy))


@functools.cache
def _declares_in_range(cls: type) -> bool:
    definer = next(c for c in cls.__mro__ if "fused_step" in c.__dict__)
    return definer.__dict__.get("fused_step_in_range", False)


class LayerState(Protocol):
    """What `EvictionPolicy.fused_step` may read and update of one cache layer (after prefill).

    Shapes: B rows, H KV heads, S slots, R = the cache's ``recent``. Update tensors in place only
    (a captured CUDA graph replays the step), and never synchronise with the host.
    """

    layer_idx: int
    sink: int  # slots below this index hold the first tokens: never victims
    features: dict[str, torch.Tensor]  # slot-aligned features, each (B, H, S, ...)
    valid: torch.Tensor  # (B, H, S) bool, contiguous
    usable: torch.Tensor  # (B, 1, S) bool: slots the row may fill (its capacity); read only
    recent_slots: torch.Tensor  # (B, H, R) int64 slots of the R last tokens, oldest first; S = none
    next_position: torch.Tensor  # (B,) int64 position of the token being added; read only

    @property
    def all_valid(self) -> bool:
        """Every slot of every (row, KV head) holds a token (host-side, no sync)."""


class EvictionPolicy(ABC):
    """Base class of every eviction policy. Subclasses are small: a `score`, maybe `token_features`.

    Class attributes:
        name: the name used in configs and results.
        needs_attention: the cache computes attention weights for this policy and calls
            `observe_attention` (eager softmax instead of fused SDPA).
        evicts: False for the full-cache reference: the cache grows instead of evicting.
        deterministic: False when a row's choices depend on anything but the row itself (e.g. on
            how rows are batched); such a policy is excluded from batch-equals-single checks.
        needs_own_step: `fused_step` is this policy's decode rule (it never returns None): the layer
            calls it whatever the cache's ``fused`` setting says.
        fills_empty_first: `fused_step` takes an empty usable slot whenever a row has one, as the
            generic path does (the layer then counts on the host when every slot is full).
        fused_step_in_range: `fused_step`'s slots lie in [0, S) by construction (see
            `fused_step_in_range`; set it in the class that defines `fused_step`).
    """

    name: ClassVar[str] = "base"
    needs_attention: ClassVar[bool] = False
    evicts: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True
    needs_own_step: ClassVar[bool] = False
    fills_empty_first: ClassVar[bool] = True
    fused_step_in_range: ClassVar[bool] = False

    def reset(self) -> None:
        """Forget any state tied to one generation (called when a new cache starts). Default: none."""
        return None

    def token_features(
        self, layer_idx: int, keys: torch.Tensor, positions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-token features of new tokens, each shaped ``(B, H, T, ...)``.

        Args:
            keys: ``(B, H, T, D)`` the new keys, post-RoPE.
            positions: ``(B, T)`` their token positions (0 = a row's first real token; padding < 0).
        """
        return {}

    @abstractmethod
    def score(self, view: SlotView) -> torch.Tensor:
        """Keep-score of every slot, ``(B, H, S)``, finite, higher = keep.

        Scores of empty or protected slots are ignored by the cache. The score may be computed in any
        float dtype; ties are broken towards evicting the lowest slot index.
        """

    def observe_attention(
        self,
        layer_idx: int,
        features: dict[str, torch.Tensor],
        attention_sum: torch.Tensor,
        attention_last: torch.Tensor,
    ) -> None:
        """Attention of this step, only for ``needs_attention`` policies, called after attention.

        Args:
            features: this layer's slot-aligned features, to be updated in place.
            attention_sum: ``(B, H, S)`` attention probability on each slot, summed over the query
                heads of each KV group and over all queries of this forward call.
            attention_last: ``(B, H, S)`` the same for the last query only (equal to
                ``attention_sum`` at decode).
        """
        return None

    def fused_step(self, layer: LayerState, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """This policy's own decode step (see the module docstring), or None for the generic path.

        Args:
            layer: the layer's state; query: (B, Hq, 1, D) and key: (B, H, 1, D), post-RoPE.
        Returns:
            (B, H, 1) int64 slots to overwrite, after updating ``valid``, ``features`` and
            ``recent_slots`` for them; or None, having changed nothing.
        """
        return None

    def stored_score(self) -> StoredScore | None:
        """How `score` reads one stored feature, for the victim kernel; None (default): `score` is
        computed as written. The feature must be (B, H, S) (one number per slot)."""
        return None

    def explain(self, view: SlotView) -> dict[str, torch.Tensor]:
        """Extra (B, H, S) per-slot quantities behind the score, by name, for diagnostics (reported
        as ``diag_<name>_logit_corr``, their correlation with the true attention logits)."""
        return {}

    def describe(self) -> dict:
        """Hyper-parameters worth recording in results (override to add more)."""
        return {"policy": self.name}
