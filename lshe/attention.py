"""The hook into transformers: an attention function that lets the evicting cache see the query.

In a Llama-family attention forward, queries and keys get RoPE, then ``cache.update(k, v, layer)``
runs, then the attention function registered under ``config._attn_implementation`` runs with the
query. `Cache.update` never sees the query, and eviction must happen *before* attention. So:

1. `EvictingCache.update` only stages the new keys/values on its layer and returns them;
2. `lshe_attention` (registered as the attention implementation ``"lshe"``) takes the staged layer,
   which evicts with the query in hand, writes the new tokens and computes attention over its slots.

The mask function registered for ``"lshe"`` hands over the 2-D padding mask unchanged (no 4-D causal
mask is built): after eviction slots are not positions, so the cache builds its own masks.

``lshe_attention`` honours the call's ``scaling``, ``sliding_window``, ``softcap`` and attention sinks
(``s_aux``) and refuses what
it does not implement (`lshe.architectures`). With any other cache (or none) it is plain causal
attention (SDPA, or explicit weights with a softcap or sinks), so a model switched to
``"lshe"`` still works without an evicting cache. `use_lshe_attention` switches a loaded model to
``"lshe"`` and `restore_attention` back; an evicting cache given to a model whose attention is not
``"lshe"`` refuses to run (`lshe.cache.EvictingCache.update`).
"""

from __future__ import annotations

import threading

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from lshe import architectures, slot_attention

ATTN_IMPLEMENTATION = "lshe"

_staged = threading.local()


def stage(layer) -> None:
    """Remember the cache layer whose update just ran; the next attention call of this thread takes it."""
    _staged.layer = layer


def _take_staged():
    layer = getattr(_staged, "layer", None)
    _staged.layer = None
    return layer


def causal_padding_mask(
    padding: torch.Tensor | None, q_len: int, kv_len: int, batch: int, device, window: int | None = None
) -> torch.Tensor:
    """Bool mask (B, 1, q_len, kv_len): query i (the last q_len of kv_len tokens) sees keys <= itself
    that are not padding, and with a sliding ``window`` W only the last W of them (keys p-W+1 .. p,
    as transformers' ``sliding_window_overlay``). A query on a padding token also sees itself, so no
    row is empty (SDPA would return NaN on an all-masked row; those outputs are never read)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (q, kv)
    if window is not None:
        causal = causal & (k_pos[None, :] > q_pos[:, None] - window)
    if padding is None:
        return causal[None, None].expand(batch, 1, q_len, kv_len)
    mask = causal[None] & padding[:, None, -kv_len:].bool()
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


def plain_attention(
    query,
    key,
    value,
    padding,
    scaling,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with an optional 2-D padding mask, sliding ``window``, logit ``softcap`` and
    attention ``sinks`` (the last two with explicit weights: SDPA has neither); returns (B, Q, Hq, D)
    like transformers does."""
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if padding is None and window is None and softcap is None and sinks is None and q_len == kv_len:
        out = scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        mask = causal_padding_mask(padding, q_len, kv_len, batch, query.device, window)
        if softcap is not None or sinks is not None:
            out = slot_attention.grouped_attention(
                query, key, value, mask, scaling, softcap=softcap, sinks=sinks
            )[0]
        else:
            out = scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
            )
    return out.transpose(1, 2).contiguous()


@torch.compiler.disable  # eviction and slot writes run eagerly inside a compiled layer (lshe.compiled)
def lshe_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    s_aux=None,
    **kwargs,
):
    """Attention implementation ``"lshe"``: evict-then-attend when an evicting cache staged this layer.

    Honours ``scaling``, ``sliding_window``, ``softcap`` and ``s_aux``; everything else that would change the
    attention (sinks, dropout, ...) is refused by `lshe.architectures.check_attention_call`.
    """
    layer = _take_staged()
    try:
        architectures.check_attention_call(module, dropout, kwargs)
        window = architectures.check_window(sliding_window, module)
        softcap = architectures.check_softcap(softcap, module)
        sinks = architectures.check_sinks(s_aux, module, query.shape[1])
    except ValueError:
        if layer is not None:
            layer.pending = None  # refused: nothing stays staged, the cache is left as it was
        raise
    if scaling is None:
        scaling = query.shape[-1] ** -0.5  # SDPA's default, made explicit for the other paths
    if layer is not None:
        if not layer.is_staged(module.layer_idx, key):  # never attend over other keys than were cached
            layer.pending = None
            raise RuntimeError(
                f"lshe attention: layer {module.layer_idx} got other keys than the evicting cache staged for "
                f"layer {layer.layer_idx} (the model changed the keys between cache.update and attention)"
            )
        return layer.attend(query, attention_mask, scaling, window=window, softcap=softcap, sinks=sinks), None
    return plain_attention(query, key, value, attention_mask, scaling, window, softcap, sinks), None


def lshe_mask(*args, attention_mask=None, **kwargs):
    """Mask function of ``"lshe"``: the 2-D (batch, tokens seen) padding mask, or None."""
    return attention_mask


AttentionInterface.register(ATTN_IMPLEMENTATION, lshe_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lshe_mask)


def use_lshe_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch a loaded model to the ``"lshe"`` attention implementation (in place) and return it.

    The implementation it had is remembered; `restore_attention` switches back to it.
    """
    current = model.config._attn_implementation
    if current != ATTN_IMPLEMENTATION:
        model._lshe_previous_attention = current
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def restore_attention(model: PreTrainedModel, default: str = "sdpa") -> PreTrainedModel:
    """Switch a model back from ``"lshe"`` to the implementation it had before `use_lshe_attention`
    (``default`` if it was loaded with ``"lshe"``), in place, and return it."""
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        model.set_attn_implementation(getattr(model, "_lshe_previous_attention", None) or default)
    return model
