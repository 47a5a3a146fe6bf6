"""The evicting KV cache: fixed slots per layer, one overwrite per (row, KV head) per decoded token.

`EvictingCache` is a transformers `Cache`. Each layer holds keys and values of shape
(batch, kv_heads, slots, head_dim), allocated once at prefill, plus a validity bit per slot and the
policy's per-token features (e.g. LSH-E's packed codes). A decode step, before attention:

1. asks the policy for a keep-score of every slot (`EvictionPolicy.score`);
2. takes an empty slot if the row still has room, else the lowest-scoring slot that is not
   protected (slots ``< sink`` hold the first tokens; the ``recent`` last written slots are kept);
   ties go to the lowest slot index;
3. overwrites that slot with the new key, value and features, and attends over the valid slots.

Slot order does not matter to attention because RoPE is already inside the keys; positions given to
the model stay the true token positions (generate derives them from the attention mask, and
`get_seq_length` reports every token seen, not the slots kept).

Budgets: an ``int > 1`` is a number of slots; a float in (0, 1] is a fraction of each row's real
length (prompt without padding + ``max_new_tokens``), rounded up. Rows of one batch can have different
budgets; storage is the largest, and a row never fills more than its own.

Prompts longer than the budget (``prefill``, default ``window``):
* ``streaming``: attention over the whole prompt, then keep the first ``sink`` and the most recent;
* ``window``: attention over the whole prompt, then keep sink + recent and the best-scored prompt
  tokens, the policy probing with the last ``window`` queries (and keys) of the prompt;
* ``sequential``: the prompt prefix that fits goes in at once, the rest token by token through the
  decode path (exact but slow), so eviction also acts on prompt tokens.
Any tokens given after the first forward call (decode steps, later chunks) take the decode path.

Must be used with a model whose attention implementation is ``"lshe"`` (`lshe.attention`), which
hands the query to the cache; `lshe.models.load_model` and `prepare_model` set it.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers.cache_utils import Cache, CacheLayerMixin

from lshe import attention as lshe_attn
from lshe import kernels
from policies.base import EvictionPolicy, SlotView

PREFILL_STRATEGIES = ("streaming", "window", "sequential")
ATTENTION_CHUNK = 512  # queries per chunk when attention weights must be materialised


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


class EvictingCache(Cache):
    """A KV cache that holds at most ``budget`` slots per layer and evicts with ``policy``.

    Args:
        policy: the eviction policy (scores slots; see `policies.base.EvictionPolicy`).
        budget: slots (int > 1) or fraction in (0, 1] of each row's prompt + ``max_new_tokens``.
        sink: number of first tokens never evicted (attention sinks), >= 0.
        recent: number of most recent tokens never evicted, >= 0.
        prefill: what to do with prompts longer than the budget: one of `PREFILL_STRATEGIES`.
        window: number of last prompt queries the policy probes with when ``prefill="window"``.
        max_new_tokens: tokens that will be generated after the prompt; required for a fraction.
        fused: on CUDA, let LSH-E choose its victims with the fused Triton kernel
            (`lshe.kernels.fused_lshe_step`; same victims as the torch path). Ignored elsewhere.
        static_control: a benchmark control, not a policy: decode steps write round-robin
            (slot = token position mod slots) with no scoring, no protection and no features, and
            attend like every fused-SDPA policy. Its step time is the denominator of the eviction
            overhead. Meant for prompts that fill the budget.
    """

    def __init__(
        self,
        policy: EvictionPolicy,
        budget: float | int = 1.0,
        sink: int = 4,
        recent: int = 10,
        prefill: str = "window",
        window: int = 32,
        max_new_tokens: int | None = None,
        fused: bool = True,
        static_control: bool = False,
    ) -> None:
        super().__init__(layers=[])
        self.fused, self.static_control = bool(fused), bool(static_control)
        if not isinstance(policy, EvictionPolicy):
            raise ValueError(f"policy must be an EvictionPolicy, got {type(policy).__name__}")
        self.policy = policy
        self.budget = validate_budget(budget)
        for key, value in (("sink", sink), ("recent", recent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        self.sink, self.recent = sink, recent
        if prefill not in PREFILL_STRATEGIES:
            raise ValueError(f"prefill must be one of {list(PREFILL_STRATEGIES)}, got {prefill!r}")
        self.prefill = prefill
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = window
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        if isinstance(self.budget, int) and policy.evicts and self.budget <= sink + recent:
            raise ValueError(
                f"budget ({self.budget} slots) must be larger than sink + recent = {sink + recent}"
            )
        if isinstance(self.budget, float) and self.budget < 1.0 and max_new_tokens is None and policy.evicts:
            raise ValueError(
                f"budget={self.budget} is a fraction of prompt + max_new_tokens: pass max_new_tokens"
            )
        self.capacity: torch.Tensor | None = None  # (B,) slots each row may fill, set at prefill
        self.observer = None  # optional diagnostics hook (lshe.diagnostics)
        policy.reset()

    # ---- transformers Cache API -------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Stage the new keys/values; `lshe_attention` evicts, writes and attends (it has the query)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(EvictingLayer(self, len(self.layers)))
        layer = self.layers[layer_idx]
        layer.pending = (key_states, value_states)
        lshe_attn.stage(layer)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (padding included), not slots kept: positions continue from here."""
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + int(query_length), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    # ---- budgets ----------------------------------------------------------------------------
    def row_capacity(self, real_lengths: torch.Tensor) -> torch.Tensor:
        """Slots each row may fill, from its real prompt length (B,), computed once per generation."""
        if self.capacity is not None and self.capacity.shape == real_lengths.shape:
            return self.capacity
        future = self.max_new_tokens or 0
        if not self.policy.evicts:
            capacity = real_lengths + future
        elif isinstance(self.budget, int):
            capacity = torch.full_like(real_lengths, self.budget)
        else:
            capacity = torch.ceil(self.budget * (real_lengths + future).double()).long()
            smallest = int(capacity.min())
            if smallest <= self.sink + self.recent:
                raise ValueError(
                    f"budget={self.budget} gives {smallest} slots for the shortest sequence; it must be "
                    f"larger than sink + recent = {self.sink + self.recent} (raise budget or lower sink/recent)"
                )
        self.capacity = capacity
        return capacity

    # ---- reporting --------------------------------------------------------------------------
    def slots(self) -> int:
        """Slots allocated per (row, KV head) in each layer."""
        return self.layers[0].keys.shape[2] if self.layers and self.layers[0].keys is not None else 0

    def nbytes(self) -> dict[str, int]:
        """Bytes the cache actually holds: keys+values, policy features (codes), bookkeeping."""
        kv = features = bookkeeping = 0
        for layer in self.layers:
            if layer.keys is None:
                continue
            kv += layer.keys.nbytes + layer.values.nbytes
            features += sum(t.nbytes for t in layer.features.values())
            bookkeeping += layer.valid.nbytes + layer.recent_slots.nbytes
        return {
            "kv": kv,
            "features": features,
            "bookkeeping": bookkeeping,
            "total": kv + features + bookkeeping,
        }

    def valid_counts(self) -> torch.Tensor:
        """(layers, B, H) number of valid slots."""
        return torch.stack([layer.valid.sum(-1) for layer in self.layers])

    # ---- replaying decode steps without Python (CUDA graphs, `lshe.fast_decode`) ----------------
    def host_state(self) -> list[tuple[int, int, int]]:
        """Per layer, the Python-side counters a decode step advances: (seen, slots_used, min_filled).

        Everything else a decode step changes is a device tensor updated in place. Capturing a step
        in a CUDA graph runs its Python once without running its kernels, so the capture must be
        undone with `set_host_state`, and each replay accounted for with `advance_host_state`.
        """
        return [(layer.seen, layer.slots_used, layer.min_filled) for layer in self.layers]

    def set_host_state(self, state: list[tuple[int, int, int]]) -> None:
        for layer, (seen, slots_used, min_filled) in zip(self.layers, state, strict=True):
            layer.seen, layer.slots_used, layer.min_filled = seen, slots_used, min_filled

    def advance_host_state(self, steps: int) -> None:
        """Account for ``steps`` decode steps that ran on the device only (graph replays)."""
        for layer in self.layers:
            layer.seen += steps
            layer.advance_fill(steps)

    def repeat_rows(self, times: int) -> None:
        """Repeat every batch row ``times`` times (row order: all copies of row 0 first), after prefill.

        For benchmarks: a decode step's cost does not depend on what the rows hold, so a cache
        prefilled once at batch 1 and repeated stands for a batch prefilled at once, which would
        need a batch-sized prefill's activation memory.
        """
        for layer in self.layers:
            layer.repeat_rows(times)
        if self.capacity is not None:
            self.capacity = self.capacity.repeat_interleave(times)


class EvictingLayer(CacheLayerMixin):
    """One layer's slots. Created by `EvictingCache.update`; filled at the first forward call."""

    is_compileable = False

    def __init__(self, cache: EvictingCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.policy = cache.policy
        self.layer_idx = layer_idx
        self.seen = 0  # tokens fed so far, padding included
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.slots_used = 0  # non-evicting caches: slots handed out so far (host-side, for growing)
        self.min_filled = 0  # fewest valid slots of any (row, KV head), counted on the host
        self.fill_limit = 0  # what min_filled can reach: the smallest row capacity

    # CacheLayerMixin API (the cache drives this layer through `attend`, not `update`)
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

    # ---- the two paths ------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, padding: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Evict, write the staged tokens and attend. query (B, Hq, Q, D) -> output (B, Q, Hq, D)."""
        key, value = self.pending
        self.pending = None
        q_len = query.shape[2]
        if self.keys is None:
            out = self._prefill(query, key, value, padding, scaling)
        else:
            out = self._decode_tokens(query, key, value, scaling)
        self.seen += q_len
        return out.transpose(1, 2).contiguous()

    def _decode_tokens(self, query, key, value, scaling) -> torch.Tensor:
        """Tokens after the prefill, one at a time (a multi-token call is a run of decode steps)."""
        outs = [
            self._decode_step(query[:, :, i : i + 1], key[:, :, i : i + 1], value[:, :, i : i + 1], scaling)
            for i in range(query.shape[2])
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _prefill(self, query, key, value, padding, scaling) -> torch.Tensor:
        batch, heads, length, _ = key.shape
        device = key.device
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
        if padding is not None:
            real = padding[:, -length:].bool()
            if bool((real[:, 1:].long() - real[:, :-1].long() < 0).any()):
                raise ValueError(
                    "EvictingCache supports left padding only (set tokenizer.padding_side='left')"
                )
        n_pad = length - real.sum(-1)  # (B,)
        positions = torch.arange(length, device=device)[None, :] - n_pad[:, None]  # (B, L), padding < 0
        capacity = self.cache.row_capacity(real.sum(-1))

        if self.cache.prefill == "sequential" and self.policy.evicts:
            # The prefix every row can take without evicting goes in at once; the rest token by token.
            prefix = min(length, int((n_pad + capacity).min()))
            if prefix < length:
                out = self._prefill(
                    query[:, :, :prefix],
                    key[:, :, :prefix],
                    value[:, :, :prefix],
                    padding[:, :prefix] if padding is not None else None,
                    scaling,
                )
                self.seen += prefix
                rest = self._decode_tokens(
                    query[:, :, prefix:], key[:, :, prefix:], value[:, :, prefix:], scaling
                )
                self.seen -= prefix  # `attend` adds the whole call's length
                return torch.cat([out, rest], dim=2)

        mask = lshe_attn.causal_padding_mask(None if padding is None else real, length, length, batch, device)
        features = self.policy.token_features(self.layer_idx, key, positions)
        if self.policy.needs_attention:
            out, attn_sum, attn_last = grouped_attention(query, key, value, mask, scaling)
            self.policy.observe_attention(self.layer_idx, features, attn_sum, attn_last)
        elif padding is None:
            out = scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            out = scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
            )

        keep = self._select_prompt_tokens(query, key, value, real, positions, capacity, features)
        self._store(key, value, keep, features, capacity, positions)
        return out

    def _select_prompt_tokens(self, query, key, value, real, positions, capacity, features) -> torch.Tensor:
        """(B, H, L) bool: which prompt tokens to keep, at most ``capacity`` per row."""
        batch, heads, length, _ = key.shape
        real = real[:, None, :].expand(batch, heads, length)
        pos = positions[:, None, :]
        real_len = real[:, 0].sum(-1)[:, None, None]
        cap = capacity[:, None, None]
        if bool((real_len <= cap).all()):
            return real  # everything fits: nothing to score
        if self.cache.prefill != "window" or not self.policy.evicts:
            # streaming (and the no-eviction case): the first `sink` tokens and the most recent ones.
            return real & ((pos < self.cache.sink) | (pos >= real_len - (cap - self.cache.sink)))
        window = min(self.cache.window, length)
        view = SlotView(
            layer_idx=self.layer_idx,
            keys=key,
            values=value,
            valid=real,
            features=features,
            queries=query[:, :, -window:],
            new_keys=key[:, :, -window:],
            new_features={name: f[:, :, -window:] for name, f in features.items()},
            probe_valid=real[:, 0, -window:],
        )
        score = self.policy.score(view).float()
        protected = (pos < self.cache.sink) | (pos >= real_len - self.cache.recent)
        score = torch.where(real, score, -math.inf).masked_fill(real & protected, math.inf)
        order = score.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(length, device=key.device).expand_as(order)
        )
        return real & (rank < cap)

    def _store(self, key, value, keep, features, capacity, positions) -> None:
        """Allocate the slots once and move the kept prompt tokens into them, in position order."""
        batch, heads, length, dim = key.shape
        kept = keep.sum(-1)  # (B, H)
        if self.policy.evicts:
            slots = int(capacity.max())
            if self.cache.max_new_tokens is not None:
                slots = min(slots, int(kept.max()) + self.cache.max_new_tokens)
        else:
            slots = int(kept.max()) + (self.cache.max_new_tokens or 0)
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
        self.usable = (torch.arange(slots, device=device)[None, :] < capacity[:, None])[
            :, None, :
        ]  # (B, 1, S)
        self.protected_sink = torch.arange(slots, device=device) < self.cache.sink  # (S,)
        # The `recent` last kept tokens sit in the slots kept-recent .. kept-1; `slots` means none.
        r = self.cache.recent
        recent = kept[..., None] - r + torch.arange(r, device=device)  # (B, H, R)
        self.recent_slots = torch.where(recent >= 0, recent, slots)
        self.next_position = (positions[:, -1] + 1).clone()  # (B,) position of the next token
        self.slots_used = int(kept.max())  # host-side, only for growing a non-evicting cache
        # Host-side fill level (one sync here, none per step): once every slot of every row and head
        # is valid, decode attention needs no mask and runs on the fastest fused kernel.
        if self.cache.static_control:
            self.min_filled = self.fill_limit = slots if bool(self.valid.all()) else 0
        else:
            self.min_filled = int(kept.min())
            self.fill_limit = min(int(capacity.min()), slots) if self.policy.evicts else slots
        if self.cache.observer is not None:
            self.cache.observer.on_prefill(self, key, value, index, positions)

    def advance_fill(self, steps: int) -> None:
        """Host-side bookkeeping of ``steps`` decode steps: each fills one empty usable slot per
        (row, KV head) while there is one (evicting) or appends one slot (non-evicting)."""
        self.slots_used += steps
        self.min_filled = min(self.min_filled + steps, self.fill_limit)

    @property
    def all_valid(self) -> bool:
        """Every slot of every (row, KV head) holds a token (known on the host, no sync)."""
        return self.min_filled >= self.keys.shape[2]

    def repeat_rows(self, times: int) -> None:
        """Repeat every batch row ``times`` times (see `EvictingCache.repeat_rows`)."""

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(times, dim=0)

        self.keys, self.values, self.valid = rows(self.keys), rows(self.values), rows(self.valid)
        self.features = {name: rows(f) for name, f in self.features.items()}
        self.usable, self.recent_slots = rows(self.usable), rows(self.recent_slots)
        self.next_position = rows(self.next_position)

    # ---- decode -------------------------------------------------------------------------------
    def _decode_step(self, query, key, value, scaling) -> torch.Tensor:
        """One token (Q = 1): choose a slot, overwrite it, attend over valid slots.

        No host synchronisation, and every tensor that outlives the step is updated in place, so a
        captured CUDA graph replays it (`lshe.fast_decode`); the Python-side counters are listed in
        `EvictingCache.host_state`.
        """
        if self.cache.static_control:
            slot = self._round_robin_slot()
            if not self.all_valid:
                self.valid.scatter_(2, slot, True)
        else:
            slot = None
            if self.cache.fused and self.cache.observer is None:
                slot = kernels.fused_lshe_step(self, query, key)  # None where it does not apply
            if slot is None:
                new_features = self.policy.token_features(self.layer_idx, key, self.next_position[:, None])
                if self.policy.evicts:
                    slot, score = self._choose_slot(query, key, new_features)
                else:
                    slot, score = self._next_free_slot(), None
                if self.cache.observer is not None:
                    self.cache.observer.on_decode(self, query, key, value, new_features, slot, score)
                self._write_state(slot, new_features)
        self._write_kv(slot, key, value)
        self.advance_fill(1)
        if self.policy.needs_attention and not self.cache.static_control:
            out, attn_sum, attn_last = grouped_attention(
                query, self.keys, self.values, self.valid[:, :, None, :], scaling
            )
            self.policy.observe_attention(self.layer_idx, self.features, attn_sum, attn_last)
        else:
            out = self._decode_attention(query, scaling)
        self.next_position.add_(1)
        return out

    def _decode_attention(self, query, scaling) -> torch.Tensor:
        """Fused attention of one query token over the valid slots: (B, Hq, 1, D) -> (B, Hq, 1, D).

        On CUDA (``fused``): the split-KV Triton kernel `lshe.kernels.decode_attention`, with the
        validity mask only while some slot is empty. Otherwise SDPA: with one query token the query
        heads of a KV group act as ``group`` queries of that KV head, so no GQA expansion of the keys
        is needed and the (B, H, 1, S) validity mask broadcasts over them.
        """
        if self.cache.fused and kernels.attention_applies(query, self.keys):  # split-KV Triton kernel
            valid = None if self.all_valid else self.valid
            return kernels.decode_attention(query, self.keys, self.values, valid, scaling)
        if query.is_cuda and self.all_valid:  # flash attention handles GQA itself
            return scaled_dot_product_attention(query, self.keys, self.values, scale=scaling, enable_gqa=True)
        batch, heads, slots = self.valid.shape
        dim = query.shape[-1]
        group = query.shape[1] // heads
        q = query.reshape(batch, heads, group, dim)
        if self.all_valid:
            out = scaled_dot_product_attention(q, self.keys, self.values, scale=scaling)
        else:
            mask = self.valid[:, :, None, :]
            out = scaled_dot_product_attention(q, self.keys, self.values, attn_mask=mask, scale=scaling)
        return out.reshape(batch, heads * group, 1, dim)

    def _round_robin_slot(self) -> torch.Tensor:
        """The static control's slot: the next token's position modulo the slots, (B, H, 1)."""
        batch, heads, slots = self.valid.shape
        return (self.next_position % slots)[:, None, None].expand(batch, heads, 1)

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

    def _choose_slot(self, query, key, new_features) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, 1) the slot each (row, KV head) overwrites: empty first, else the lowest score;
        and the policy's (B, H, S) scores."""
        score = self.policy.score(self.slot_view(query, key, new_features)).float()
        protected = self._protected()
        masked = torch.where(self.valid, score, -math.inf)
        masked = masked.masked_fill((self.valid & protected) | ~self.usable, math.inf)
        return masked.argmin(dim=-1, keepdim=True), score

    def _protected(self) -> torch.Tensor:
        """(B, H, S) bool: sink slots and the slots of the `recent` last tokens."""
        batch, heads, slots = self.valid.shape
        recent = torch.zeros(batch, heads, slots + 1, dtype=torch.bool, device=self.valid.device)
        recent.scatter_(2, self.recent_slots, True)
        return recent[..., :slots] | self.protected_sink

    def _next_free_slot(self) -> torch.Tensor:
        """Non-evicting policies: the first empty slot, growing the storage when none is left."""
        if self.slots_used >= self.keys.shape[2]:
            self._grow(max(16, self.keys.shape[2] // 2))
        return self.valid.sum(-1, keepdim=True)  # valid slots form a prefix when nothing is evicted

    def _grow(self, extra: int) -> None:
        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], extra, *t.shape[3:])], dim=2)

        self.keys, self.values, self.valid = pad(self.keys), pad(self.values), pad(self.valid)
        self.features = {name: pad(f) for name, f in self.features.items()}
        slots = self.keys.shape[2]
        self.recent_slots = torch.where(self.recent_slots >= slots - extra, slots, self.recent_slots)
        self.usable = torch.ones(1, 1, slots, dtype=torch.bool, device=self.keys.device)
        self.fill_limit = slots
        self.protected_sink = torch.arange(slots, device=self.keys.device) < self.cache.sink

    def _write_kv(self, slot, key, value) -> None:
        """Overwrite one slot per (row, KV head) with the new token's key and value."""
        index = slot[..., None].expand(-1, -1, -1, key.shape[-1])
        self.keys.scatter_(2, index, key)
        self.values.scatter_(2, index, value)

    def _write_state(self, slot, new_features) -> None:
        """Mark the slot valid, store the new token's features, make it the most recent token."""
        self.valid.scatter_(2, slot, True)
        for name, feat in new_features.items():
            buf = self.features[name]
            idx = slot.reshape(*slot.shape, *([1] * (buf.dim() - 3))).expand(-1, -1, -1, *buf.shape[3:])
            buf.scatter_(2, idx, feat.to(buf.dtype))
        if self.recent_slots.shape[-1] > 0:  # in place, so that a captured CUDA graph replays it
            self.recent_slots.copy_(torch.cat([self.recent_slots[..., 1:], slot], dim=-1))


def grouped_attention(query, key, value, mask, scaling, chunk: int = ATTENTION_CHUNK):
    """Attention with explicit weights, GQA-aware, chunked over queries.

    Args:
        query: (B, Hq, Q, D); key, value: (B, H, S, D); mask: bool broadcastable to (B, H, Q, S).
    Returns:
        output (B, Hq, Q, D); attention summed over each group's query heads and all queries
        (B, H, S); the same for the last query only (B, H, S). Weights are float32.
    """
    batch, q_heads, q_len, dim = query.shape
    heads = key.shape[1]
    group = q_heads // heads
    q = query.reshape(batch, heads, group, q_len, dim)
    mask = mask.expand(batch, heads, q_len, key.shape[2]) if mask.shape[1] == 1 else mask
    outs = []
    attn_sum = torch.zeros(batch, heads, key.shape[2], dtype=torch.float32, device=key.device)
    probs = None
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        logits = torch.einsum("bhgqd,bhsd->bhgqs", q[:, :, :, start:stop], key).float() * scaling
        logits = logits.masked_fill(~mask[:, :, None, start:stop], -math.inf)
        probs = torch.softmax(logits, dim=-1)
        attn_sum += probs.sum(dim=(2, 3))
        outs.append(torch.einsum("bhgqs,bhsd->bhgqd", probs.to(value.dtype), value))
    out = torch.cat(outs, dim=3).reshape(batch, q_heads, q_len, dim)
    attn_last = probs[:, :, :, -1].sum(dim=2)
    return out, attn_sum, attn_last
