"""The evicting KV cache: fixed slots per layer, one overwrite per (row, KV head) per decoded token.

`EvictingCache` is a transformers `Cache` of `lshe.layer.EvictingLayer`s. Each layer holds keys and
values of shape (batch, kv_heads, slots, head_dim), allocated once at prefill, plus a validity bit
per slot and the policy's per-token features (e.g. LSH-E's packed codes). A decode step, before
attention:

1. asks the policy for a keep-score of every slot (`EvictionPolicy.score`), unless the policy
   chooses and writes its victims itself (`EvictionPolicy.fused_step`, e.g. a fused GPU kernel);
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

Prompts longer than the budget are handled by ``prefill`` (`lshe.prefill`: streaming, window,
sequential). Any tokens given after the first forward call (decode steps, later chunks) take the
decode path.

Generate modes that reorder or select rows (beam search, ``num_return_sequences``) move every per-row
tensor together (`reorder_cache`, `batch_select_indices`, `batch_repeat_interleave`). Modes that roll
the cache back (assisted decoding, contrastive search) are refused: eviction cannot be undone.

Must be used with a model whose attention implementation is ``"lshe"`` (`lshe.attention`), which
hands the query to the cache; `lshe.models.load_model(..., attn_implementation="lshe")` and
`lshe.attention.use_lshe_attention` set it. Otherwise the cache refuses at its next update.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from lshe import attention as lshe_attn
from lshe.layer import CANNOT_CROP, EvictingLayer
from lshe.settings import PREFILL_STRATEGIES, CacheSettings, validate_budget
from policies.base import EvictionPolicy

__all__ = ["EvictingCache", "PREFILL_STRATEGIES", "validate_budget"]

NOT_HOOKED = (
    "EvictingCache: layer {layer} staged its keys but the model's attention never took them, so the "
    "model does not use the 'lshe' attention implementation and would attend to nothing. Load the "
    "model with lshe.models.load_model(..., attn_implementation='lshe') or switch it with lshe.attention.use_lshe_attention(model), then use a new cache."
)


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
        fused: on CUDA, let a policy with a fused step use it (`EvictionPolicy.fused_step`, e.g.
            LSH-E's Triton kernel: same victims as the torch path), and attend with the split-KV
            Triton kernel. Ignored elsewhere.
    """

    layer_class: type[EvictingLayer] = EvictingLayer

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
    ) -> None:
        super().__init__(layers=[])
        if not isinstance(policy, EvictionPolicy):
            raise ValueError(f"policy must be an EvictionPolicy, got {type(policy).__name__}")
        self.policy = policy
        self.settings = CacheSettings(budget, sink, recent, prefill, window, max_new_tokens, fused)
        self.settings.check_for(policy.evicts)
        self._staged: EvictingLayer | None = None  # the layer whose update ran last
        policy.reset()

    def make_layer(self, layer_idx: int) -> EvictingLayer:
        """A new layer (subclasses return their own layer class with extra arguments)."""
        return self.layer_class(self.policy, self.settings, layer_idx)

    # ---- transformers Cache API -------------------------------------------------------------
    @torch.compiler.disable  # a compiled decoder layer (lshe.compiled) calls it eagerly
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Stage the new keys/values; `lshe_attention` evicts, writes and attends (it has the query)."""
        staged = self._staged
        if staged is not None and staged.pending is not None:
            raise RuntimeError(NOT_HOOKED.format(layer=staged.layer_idx))
        while len(self.layers) <= layer_idx:
            self.layers.append(self.make_layer(len(self.layers)))
        layer = self.layers[layer_idx]
        layer.pending = (key_states, value_states)
        self._staged = layer
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

    def crop(self, tokens_to_remove: int) -> None:
        """Only ``crop(0)`` (nothing to remove) is accepted: eviction cannot be undone."""
        if tokens_to_remove != 0:
            raise ValueError(CANNOT_CROP)

    # ---- budgets and reporting ----------------------------------------------------------------
    @property
    def capacity(self) -> torch.Tensor | None:
        """(B,) slots each row may fill, set at prefill (None before): the budget, as held by the
        full-attention layers (a sliding-window layer holds at most its window: ``layers[i].capacity``)."""
        full = [layer for layer in self.layers if layer.window is None] or self.layers
        return full[0].capacity if full else None

    def slots(self) -> int:
        """Slots allocated per (row, KV head): the most of any layer (sliding layers may hold fewer)."""
        return max((layer.keys.shape[2] for layer in self.layers if layer.keys is not None), default=0)

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

    def extend(self, extra: int) -> None:
        """Give every row ``extra`` more usable slots, after the prefill (kvpress's protocol: the context
        was compressed to the budget, and the question and answer, ``extra`` tokens, are then appended
        without evicting anything). Empty slots are always taken before any eviction, so the next
        ``extra`` tokens evict nothing. A sliding-window layer grows to its window at most; a
        non-evicting policy grows by itself. Call it between forward calls, never inside one."""
        if extra < 0:
            raise ValueError(f"extra must be >= 0, got {extra}")
        if not self.policy.evicts or extra == 0:
            return
        for layer in self.layers:
            if layer.keys is None:
                continue
            slots = layer.keys.shape[2]
            grow = extra if layer.window is None else max(0, min(extra, layer.window - slots))
            capacity = layer.capacity + extra
            if layer.window is not None:
                capacity = capacity.clamp(max=layer.window)
            if grow:
                layer.grow(grow)
            slots = layer.keys.shape[2]
            layer.capacity = capacity.clamp(max=slots)
            layer.usable = (torch.arange(slots, device=layer.keys.device)[None, :] < layer.capacity[:, None])[
                :, None, :
            ]
            layer.count_fill()

    def valid_counts(self) -> torch.Tensor:
        """(layers, B, H) number of valid slots (on the first layer's device: layers may sit on several)."""
        device = self.layers[0].valid.device if self.layers else None
        return torch.stack([layer.valid.sum(-1).to(device) for layer in self.layers])

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

    def refuse_growth(self) -> None:
        """Raise if a non-evicting layer would grow its storage at the next step (it has no empty slot
        left): a CUDA-graph replay runs no Python, so it could not, and would write past the slots."""
        for layer in self.layers:
            if layer.keys is not None and layer.must_grow():
                raise RuntimeError(
                    f"layer {layer.layer_idx} of this {self.policy.name} cache has no free slot for another "
                    f"decode step ({layer.keys.shape[2]} slots, all used), and a CUDA-graph replay cannot grow "
                    "it: create the cache with max_new_tokens covering every decode step (as the runners do)"
                )

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
        self.batch_repeat_interleave(times)
