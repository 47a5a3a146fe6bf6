"""One layer of the evicting cache: slot storage, the decode step, the writes, and row moves.

A layer holds keys and values of shape (B, H, S, D), allocated once at its first forward call
(`lshe.prefill`), a validity bit per slot, the policy's slot-aligned features, and per row: which
slots it may fill (``usable``, from its capacity), the slots of its ``recent`` last tokens and the
position of its next token. It knows its `CacheSettings` and its policy, never the cache.

Decode step (one token, before attention): the policy's own step if it has one
(`EvictionPolicy.fused_step`), else the policy scores every slot and the layer takes an empty usable
slot first, else the lowest-scoring unprotected one (ties to the lowest index); then it overwrites
that slot and attends over the valid slots. On CUDA the writes (key, value, validity bit, position,
a non-evicting layer's next free slot) go with the Triton attention call where the slot is in range
by construction (`folds`, `lshe.kernels.SlotWrite`): done by the attention launch itself where
its grid fits one wave (small batches), else as launches of their own around it. No host synchronisation, and
every tensor that outlives a step is updated in place, so a captured CUDA graph replays it
(`lshe.fast_decode`).

Sliding-window layers (the attention call passes ``sliding_window`` = W: a query at position p sees
positions p-W+1 .. p) hold at most W slots per row, whatever the budget: ``capacity`` is
min(budget slots, W). Each slot's token position is kept (``slot_position``), and before every
decode write the slots whose token has left the new token's window are marked empty, so they are
the first to be reused (empty slots are taken before any eviction). With at most W slots at most
one token leaves per step, so after every write each valid slot is inside the window: attention
needs no extra mask, and a budget of W slots or more keeps the layer exact (a ring of the last W
tokens). A smaller budget evicts inside the window with the policy, as full layers do. Sink tokens
leave a window too, so a sliding layer protects no sink slots (``sink = 0``); it protects its
``recent`` last tokens like every layer. Full-attention layers of the same model are unchanged.

Subclasses observe a layer through two no-op hooks, `on_prefill` and `on_write`
(`lshe.diagnostics`); a subclass that must see every score sets ``allows_fast_path = False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from transformers.cache_utils import CacheLayerMixin

from lshe import attention_stats, kernels, prefill, slot_attention, victim_kernel, victims
from lshe.settings import CacheSettings
from policies.base import EvictionPolicy, SlotView, fused_step_in_range, stored_score_in_use
from policies.random import hash_base

CANNOT_CROP = (
    "EvictingCache cannot crop tokens: eviction cannot be undone, so generate modes that roll the cache "
    "back (assisted / speculative decoding, prompt lookup, contrastive search) are not supported"
)


class EvictingLayer(CacheLayerMixin):
    """One layer's slots. Created by `EvictingCache.update`; filled at the first forward call."""

    is_compileable = False
    allows_fast_path: ClassVar[bool] = True  # may call `EvictionPolicy.fused_step`

    def __init__(self, policy: EvictionPolicy, settings: CacheSettings, layer_idx: int) -> None:
        super().__init__()
        self.policy, self.settings, self.layer_idx = policy, settings, layer_idx
        self.sink = settings.sink  # slots below this index hold the first tokens (protected)
        self.seen = 0  # tokens fed so far, padding included
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.capacity: torch.Tensor | None = None  # (B,) slots each row may fill
        self.slots_used = 0  # non-evicting caches: slots handed out so far (host-side, for growing)
        self.min_filled = 0  # fewest valid slots of any (row, KV head), counted on the host
        self.fill_limit = 0  # what min_filled can reach: the smallest row capacity
        # Set by the first attention call: the layer's sliding window (None: full attention), logit
        # soft-cap and attention sinks (Hq,); a sliding layer also keeps each slot's token position.
        self.window: int | None = None
        self.softcap: float | None = None
        self.sinks: torch.Tensor | None = None
        self.slot_position: torch.Tensor | None = None
        self.free_slot: torch.Tensor | None = None  # (B, H, 1) int64, set by `count_fill`

    # ---- CacheLayerMixin API (the cache drives this layer through `attend`, not `update`) -----
    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("EvictingLayer is updated through EvictingCache.update and lshe_attention")

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self.seen + int(query_length), 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def is_staged(self, layer_idx: int, key: torch.Tensor) -> bool:
        return self.pending is not None and layer_idx == self.layer_idx and self.pending[0] is key

    # ---- hooks for observers (no-ops here) ----------------------------------------------------
    def on_prefill(self, key, value, index, positions) -> None:
        """After the prompt is stored: ``index`` (B, H, n) the prompt token of each filled slot."""

    def on_write(self, query, key, value, new_features, slot, score) -> None:
        """At a generic decode step, before ``slot`` (B, H, 1) is overwritten; ``score`` (B, H, S)
        the policy's scores, or None for a non-evicting policy."""

    # ---- the two paths ------------------------------------------------------------------------
    def attend(
        self,
        query: torch.Tensor,
        padding: torch.Tensor | None,
        scaling: float,
        window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evict, write the staged tokens and attend. query (B, Hq, Q, D) -> output (B, Q, Hq, D).

        ``window`` (sliding window W), ``softcap`` and ``sinks`` (Hq,) are the attention call's; they
        are the layer's from its first call on (a layer cannot change its kind between calls).
        """
        key, value = self.pending
        self.pending = None
        if self.keys is None:
            self.window, self.softcap, self.sinks = window, softcap, sinks
            if window is not None:
                self.sink = 0  # the first tokens leave the window: nothing to protect
            out = prefill.prefill(self, query, key, value, padding, scaling)
        else:
            if (window, softcap, sinks is None) != (self.window, self.softcap, self.sinks is None):
                raise ValueError(
                    f"layer {self.layer_idx} was prefilled with sliding_window={self.window}, softcap="
                    f"{self.softcap}, sinks={self.sinks is not None} and is now called with sliding_window="
                    f"{window}, softcap={softcap}, sinks={sinks is not None}"
                )
            out = self.decode_tokens(query, key, value, scaling)
        self.seen += query.shape[2]
        return out.transpose(1, 2).contiguous()

    def decode_tokens(self, query, key, value, scaling, real: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the prefill, one at a time (a multi-token call is a run of decode steps).

        ``real`` (B, Q) bool, where some of the tokens are left padding (the sequential prefill of a
        batch whose rows differ in length by more than a row's capacity): a padding token advances
        its row's position but leaves the row's slots, features and recent list as they were (one
        host synchronisation per such step, to recount the fill level).
        """
        outs = []
        for i in range(query.shape[2]):
            step = (query[:, :, i : i + 1], key[:, :, i : i + 1], value[:, :, i : i + 1], scaling)
            if real is None or bool(real[:, i].all()):
                outs.append(self.decode_step(*step))
                continue
            pad = ~real[:, i]
            saved = [t.clone() for t in self.row_tensors()]
            outs.append(self.decode_step(*step))
            for current, before in zip(self.row_tensors(), saved, strict=True):
                current[pad] = before[pad]
            self.count_fill()
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def row_tensors(self) -> list[torch.Tensor]:
        """The per-row tensors a decode step writes, but the position of the next token and the next
        free slot (`count_fill` recounts it)."""
        tensors = [self.keys, self.values, self.valid, self.recent_slots, *self.features.values()]
        return tensors if self.slot_position is None else [*tensors, self.slot_position]

    def allocate(self, key, value, keep, features, capacity, positions) -> None:
        """Allocate the slots once and move the kept prompt tokens (B, H, L) into them, in order."""
        batch, heads, length, dim = key.shape
        max_new = self.settings.max_new_tokens
        kept = keep.sum(-1)  # (B, H)
        if self.policy.evicts:
            slots = int(capacity.max())
            if max_new is not None:
                slots = min(slots, int(kept.max()) + max_new)
        else:
            slots = int(kept.max()) + (max_new or 0)
        if self.window is not None:
            slots = min(slots, self.window)
        slots = max(slots, 1)
        device = key.device
        arange = torch.arange(length, device=device)
        order = torch.argsort((~keep).long() * length + arange, dim=-1, stable=True)  # kept first, in order
        n = min(length, slots)
        index = order[..., :n]

        self.keys = key.new_zeros(batch, heads, slots, dim)
        self.values = value.new_zeros(batch, heads, slots, dim)
        self.valid = torch.zeros(batch, heads, slots, dtype=torch.bool, device=device)
        self.keys[:, :, :n] = key.gather(2, index[..., None].expand(-1, -1, -1, dim))
        self.values[:, :, :n] = value.gather(2, index[..., None].expand(-1, -1, -1, dim))
        self.valid[:, :, :n] = keep.gather(2, index)
        self.features = {}
        for name, feat in features.items():
            buf = feat.new_zeros(batch, heads, slots, *feat.shape[3:])
            idx = index.reshape(*index.shape, *([1] * (feat.dim() - 3))).expand(-1, -1, -1, *feat.shape[3:])
            buf[:, :, :n] = feat.gather(2, idx)
            self.features[name] = buf
        self.capacity = capacity
        self.usable = (torch.arange(slots, device=device)[None, :] < capacity[:, None])[:, None, :]  # (B,1,S)
        self.protected_sink = torch.arange(slots, device=device) < self.sink  # (S,)
        # The `recent` last kept tokens sit in the slots kept-recent .. kept-1; `slots` means none.
        recent = kept[..., None] - self.settings.recent + torch.arange(self.settings.recent, device=device)
        self.recent_slots = torch.where(recent >= 0, recent, slots)  # (B, H, R)
        self.next_position = (positions[:, -1] + 1).clone()  # (B,) position of the next token
        if self.window is not None:
            self.slot_position = torch.full((batch, heads, slots), -1, dtype=torch.long, device=device)
            self.slot_position[:, :, :n] = positions[:, None, :].expand(batch, heads, length).gather(2, index)
        self.count_fill()
        self.on_prefill(key, value, index, positions)

    def count_fill(self) -> None:
        """Host-side fill level, read from the device (one sync, after prefill and row moves only), and
        a non-evicting full-attention layer's next free slot (`free_slot`, a new device tensor).

        Once every slot of every row and head is valid, decode attention needs no mask and runs on
        the fastest fused kernel. A policy whose writes may skip empty slots
        (``fills_empty_first = False``) counts as full only when it is full now, for good.
        """
        slots = self.keys.shape[2]
        counts = self.valid.sum(-1)
        self.slots_used = int(counts.max())  # only for growing a non-evicting cache
        # A non-evicting full-attention layer's valid slots form a prefix: the next free slot per
        # (row, KV head), advanced by each decode step in place (CUDA graphs replay it).
        self.free_slot = counts[..., None].clone() if not self.policy.evicts and self.window is None else None
        if not self.policy.fills_empty_first:
            self.min_filled = self.fill_limit = slots if bool(self.valid.all()) else 0
        else:
            self.min_filled = int(counts.min())
            self.fill_limit = min(int(self.capacity.min()), slots) if self.policy.evicts else slots

    def advance_fill(self, steps: int) -> None:
        """Host-side bookkeeping of ``steps`` decode steps: each fills one empty usable slot per
        (row, KV head) while there is one (evicting) or appends one slot (non-evicting)."""
        self.slots_used += steps
        self.min_filled = min(self.min_filled + steps, self.fill_limit)

    @property
    def all_valid(self) -> bool:
        """Every slot of every (row, KV head) holds a token (known on the host, no sync). Never
        claimed for a sliding layer: slots leave its window on the device, unseen by the host."""
        return self.window is None and self.min_filled >= self.keys.shape[2]

    # ---- decode -------------------------------------------------------------------------------
    def decode_step(self, query, key, value, scaling) -> torch.Tensor:
        """One token (Q = 1): choose a slot, overwrite it, attend over valid slots."""
        policy = self.policy
        if self.window is not None:  # tokens that left the new token's window: empty, reused first
            self.valid &= self.slot_position > (self.next_position - self.window)[:, None, None]
        slot = None
        if self.allows_fast_path and (self.settings.fused or policy.needs_own_step):
            slot = policy.fused_step(self, query, key)  # None: take the generic path
        in_range = slot is None or fused_step_in_range(policy)  # the generic path's slots are (`folds`)
        mark_valid = False  # the slot's validity bit is left to the write (a policy's own step sets it)
        if slot is None:
            new_features = policy.token_features(self.layer_idx, key, self.next_position[:, None])
            if policy.evicts and self.allows_fast_path and self.settings.fused and victim_kernel.applies(key):
                # Two Triton launches: protected argmin, mark valid, push recent (same victims as below);
                # a stored score is read, and its new value written, by the kernel itself.
                score = self.kernel_score(new_features)
                if score is None:
                    score = policy.score(self.slot_view(query, key, new_features))
                slot = victim_kernel.protected_argmin_write(
                    score, self.valid, self.usable, self.recent_slots, self.sink
                )
                if isinstance(score, victim_kernel.FeatureScore):  # the kernel wrote that feature
                    new_features = {
                        k: v for k, v in new_features.items() if self.features[k] is not score.feature
                    }
                self.write_features(slot, new_features)
            else:
                if policy.evicts:
                    slot, score = self.choose_slot(query, key, new_features)
                else:
                    slot, score = self.next_free_slot(), None
                self.on_write(query, key, value, new_features, slot, score)
                self.write_state(slot, new_features, mark_valid=False)
                mark_valid = True
        if self.window is not None:
            self.slot_position.scatter_(2, slot, self.next_position[:, None, None].expand_as(slot))
        self.advance_fill(1)
        write = kernels.SlotWrite(
            slot,
            key,
            value,
            mark_valid=self.valid if mark_valid else None,
            next_position=self.next_position,
            advance_slot=slot is self.free_slot,  # a non-evicting layer's next free slot moves on
        )
        folded = self.folds(query, write, in_range)
        if not folded:  # the writes as launches of their own
            write.before_attention(self.keys, self.values, fused=self.settings.fused)
        if policy.needs_attention and self.settings.fused and attention_stats.applies(query, self.keys):
            # Split-KV Triton attention that also sums each slot's probability (no explicit weights).
            valid = None if self.all_valid else self.valid
            out, attn_sum = attention_stats.decode_attention_with_stats(
                query,
                self.keys,
                self.values,
                valid,
                scaling,
                self.softcap,
                self.sinks,
                write if folded else None,
            )
            policy.observe_attention(self.layer_idx, self.features, attn_sum, attn_sum)
        elif policy.needs_attention:
            out, attn_sum, attn_last = slot_attention.grouped_attention(
                query,
                self.keys,
                self.values,
                self.valid[:, :, None, :],
                scaling,
                softcap=self.softcap,
                sinks=self.sinks,
            )
            policy.observe_attention(self.layer_idx, self.features, attn_sum, attn_last)
        else:
            out = slot_attention.decode_attention(
                query,
                self.keys,
                self.values,
                self.valid,
                self.all_valid,
                scaling,
                self.settings.fused,
                softcap=self.softcap,
                sinks=self.sinks,
                write=write if folded else None,
            )
        if not folded:
            write.after_attention()
        return out

    def folds(self, query: torch.Tensor, write: kernels.SlotWrite, in_range: bool) -> bool:
        """Whether the step's writes (key, value, validity bit, next free slot, position) go to the Triton
        attention call (`kernels.SlotWrite`), else they are launches of their own around it.

        Only where that call is the Triton one (`fused`, CUDA, no explicit weights) and only for a
        slot in range by construction: the attention kernel does not check it, so the slots of a
        policy's own `fused_step` are folded only where its class says so (`fused_step_in_range`);
        others go through `write_kv`, which fails loudly on a slot out of range. A non-evicting
        layer's `free_slot` is in range because the host grows the storage before it runs out
        (`must_grow`), and CUDA-graph replays, which cannot, are refused first
        (`EvictingCache.refuse_growth`). Per layer and step this saves two to four ~3 us launches at
        batch 1 (docs/measurement-log.md, note 20).
        """
        return (
            in_range
            and self.settings.fused
            and kernels.attention_applies(query, self.keys)
            and not (self.policy.needs_attention and write.advance_slot)  # the statistics kernel does not
            and write.fits(self.keys, self.values)
        )

    def kernel_score(self, new_features: dict[str, torch.Tensor]) -> victim_kernel.FeatureScore | None:
        """The policy's `stored_score` as the victim kernel's `FeatureScore`, or None (the policy has
        none in use, its feature is not a contiguous (B, H, S) tensor, or a hashed one is not int64)."""
        stored = stored_score_in_use(self.policy)
        if stored is None:
            return None
        feature = self.features.get(stored.feature)
        if feature is None or feature.shape != self.valid.shape or not feature.is_contiguous():
            return None
        new_value = new_features[stored.feature]
        hashed = stored.hash_seed is not None
        if hashed and (feature.dtype != torch.int64 or new_value.dtype != torch.int64):
            return None  # the kernel hashes int64 positions only
        return victim_kernel.FeatureScore(
            feature,
            new_value,
            sign=stored.sign,
            hash_base=hash_base(stored.hash_seed, self.layer_idx) if hashed else None,
        )

    def slot_view(self, query, key, new_features) -> SlotView:
        """What the policy sees at a decode step: this layer's slots and the step's query and key."""
        return SlotView(
            layer_idx=self.layer_idx,
            keys=self.keys,
            values=self.values,
            valid=self.valid,
            features=self.features,
            queries=query,
            new_keys=key,
            new_features=new_features,
        )

    def choose_slot(self, query, key, new_features) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, 1) the slot each (row, KV head) overwrites: empty first, else the lowest score;
        and the policy's (B, H, S) scores."""
        score = self.policy.score(self.slot_view(query, key, new_features)).float()
        unusable = victims.unusable_mask(self)
        slot = victims.protected_argmin(
            score, self.valid, unusable, self.recent_slots, self.sink, self.all_valid
        )
        return slot, score

    def protected(self) -> torch.Tensor:
        """(B, H, S) bool: sink slots and the slots of the `recent` last tokens."""
        batch, heads, slots = self.valid.shape
        recent = torch.zeros(batch, heads, slots + 1, dtype=torch.bool, device=self.valid.device)
        recent.scatter_(2, self.recent_slots, True)
        return recent[..., :slots] | self.protected_sink

    def next_free_slot(self) -> torch.Tensor:
        """Non-evicting policies: the first empty slot, growing the storage when none is left (a
        sliding layer grows to its window at most: from there a slot leaves the window every step).
        A full-attention layer returns `free_slot` itself, which the step advances after its write."""
        slots = self.keys.shape[2]
        if self.window is not None:
            if self.must_grow():
                self.grow(min(max(16, slots // 2), self.window - slots))
            return (~self.valid).int().argmax(-1, keepdim=True)  # valid slots need not be a prefix
        if self.must_grow():
            self.grow(max(16, slots // 2))
        return self.free_slot

    def must_grow(self) -> bool:
        """A non-evicting layer has no empty slot left for the next token (host-side count): its storage
        grows at the next step, which a CUDA-graph replay cannot do (`EvictingCache.refuse_growth`)."""
        slots = self.keys.shape[2]
        full = not self.policy.evicts and self.slots_used >= slots
        return full and (self.window is None or slots < self.window)

    def grow(self, extra: int) -> None:
        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], extra, *t.shape[3:])], dim=2)

        self.keys, self.values, self.valid = pad(self.keys), pad(self.values), pad(self.valid)
        self.features = {name: pad(f) for name, f in self.features.items()}
        if self.slot_position is not None:
            self.slot_position = pad(self.slot_position)
        batch, _, slots = self.valid.shape
        self.recent_slots = torch.where(self.recent_slots >= slots - extra, slots, self.recent_slots)
        self.usable = torch.ones(batch, 1, slots, dtype=torch.bool, device=self.keys.device)
        self.fill_limit = slots
        self.protected_sink = torch.arange(slots, device=self.keys.device) < self.sink

    def write_state(self, slot, new_features, mark_valid: bool = True) -> None:
        """Mark the slot valid (unless ``mark_valid`` is False: the caller does it), store the new
        token's features, make it the most recent token (of a policy that evicts)."""
        if mark_valid:
            self.valid.scatter_(2, slot, True)
        self.write_features(slot, new_features)
        if self.policy.evicts:  # recent tokens are protected from eviction; nothing to protect otherwise
            victims.push_recent(self.recent_slots, slot)  # in place, so that a captured CUDA graph replays it

    def write_features(self, slot, new_features) -> None:
        """Store the new token's features (each (B, H, 1, ...)) in ``slot`` (B, H, 1)."""
        for name, feat in new_features.items():
            buf = self.features[name]
            idx = slot.reshape(*slot.shape, *([1] * (buf.dim() - 3))).expand(-1, -1, -1, *buf.shape[3:])
            buf.scatter_(2, idx, feat.to(buf.dtype))

    # ---- rows: beam search, num_return_sequences, benchmarks ----------------------------------
    def move_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``rows`` (a function of a tensor's batch dimension) to every per-row tensor."""
        if self.keys is None:
            return
        self.keys, self.values, self.valid = rows(self.keys), rows(self.values), rows(self.valid)
        self.features = {name: rows(f) for name, f in self.features.items()}
        self.usable, self.recent_slots = rows(self.usable), rows(self.recent_slots)
        self.next_position, self.capacity = rows(self.next_position), rows(self.capacity)
        if self.slot_position is not None:
            self.slot_position = rows(self.slot_position)
        self.count_fill()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.move_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.move_rows(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.move_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(CANNOT_CROP)
