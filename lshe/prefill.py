"""The first forward call of a layer: attention over the prompt, then which prompt tokens to keep.

Prompts longer than a row's capacity (``CacheSettings.prefill``):

* ``streaming``: attention over the whole prompt, then keep the first ``sink`` and the most recent;
* ``window``: attention over the whole prompt, then keep sink + recent and the best-scored prompt
  tokens, the policy probing with the last ``window`` queries (and keys) of the prompt;
* ``sequential``: the prompt prefix that every row can take goes in at once, the rest token by token
  through the decode path (exact but slow), so eviction also acts on prompt tokens.

A sliding-window layer (``layer.window`` = W) attends with the sliding mask, may fill at most W slots
per row, and keeps only prompt tokens the next query still sees (the last W-1), choosing among them
as above when they do not fit, without sink tokens (see `lshe.layer`). A logit soft-cap
(``layer.softcap``) or attention sinks (``layer.sinks``) take the explicit-weights attention (SDPA
has neither).

Only left padding is supported (a row's real tokens are its last ones).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lshe import attention_stats, slot_attention
from lshe.attention import causal_padding_mask
from lshe.settings import CacheSettings, row_capacity
from policies.base import EvictionPolicy, SlotView

if TYPE_CHECKING:
    from lshe.layer import EvictingLayer


def prefill(
    layer: EvictingLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding: torch.Tensor | None,
    scaling: float,
    capacity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend over the prompt and store the tokens to keep in ``layer``; (B, Hq, L, D) -> (B, Hq, L, D).

    ``padding`` is the (B, L) 2-D attention mask or None; ``capacity`` (B,) is computed here from the
    real prompt lengths unless given (the sequential strategy passes the whole prompt's).
    """
    settings, policy = layer.settings, layer.policy
    batch, heads, length, _ = key.shape
    device = key.device
    real = torch.ones(batch, length, dtype=torch.bool, device=device)
    if padding is not None:
        real = padding[:, -length:].bool()
        right_padded, padded = torch.stack(
            [(real[:, 1:].long() - real[:, :-1].long() < 0).any(), ~real.all()]
        ).tolist()  # one host synchronisation for both
        if right_padded:
            raise ValueError("EvictingCache supports left padding only (set tokenizer.padding_side='left')")
        if not padded:  # an all-ones mask, as transformers does: causal SDPA (flash), not an explicit mask
            padding = None
    n_pad = length - real.sum(-1)  # (B,)
    positions = torch.arange(length, device=device)[None, :] - n_pad[:, None]  # (B, L), padding < 0
    if capacity is None:
        capacity = row_capacity(settings, policy.evicts, real.sum(-1))
        if layer.window is not None:
            capacity = capacity.clamp(max=layer.window)  # a sliding layer never needs more

    if settings.prefill == "sequential" and policy.evicts:
        # The prefix every row can take without evicting goes in at once; the rest token by token.
        prefix = min(length, int((n_pad + capacity).min()))
        if prefix < length:
            head = (query[:, :, :prefix], key[:, :, :prefix], value[:, :, :prefix])
            out = prefill(layer, *head, None if padding is None else padding[:, :prefix], scaling, capacity)
            layer.seen += prefix
            rest = layer.decode_tokens(
                query[:, :, prefix:],
                key[:, :, prefix:],
                value[:, :, prefix:],
                scaling,
                None if padding is None else real[:, prefix:],  # rows still in their padding
            )
            layer.seen -= prefix  # `attend` adds the whole call's length
            return torch.cat([out, rest], dim=2)

    window, softcap, sinks = layer.window, layer.softcap, layer.sinks
    mask = causal_padding_mask(None if padding is None else real, length, length, batch, device, window)
    features = policy.token_features(layer.layer_idx, key, positions)
    plain = padding is None and window is None and softcap is None and sinks is None  # SDPA's causal
    if (
        policy.needs_attention
        and plain
        and settings.fused
        and layer.allows_fast_path
        and attention_stats.prompt_applies(query, key)
    ):
        # SDPA's output and the statistics from a flash-style Triton pass: no explicit weights.
        out = slot_attention.prompt_attention(query, key, value, None, scaling)
        attn_sum, attn_last = attention_stats.prompt_attention_stats(query, key, scaling)
        policy.observe_attention(layer.layer_idx, features, attn_sum, attn_last)
    elif policy.needs_attention:
        out, attn_sum, attn_last = slot_attention.grouped_attention(
            query, key, value, mask, scaling, softcap=softcap, sinks=sinks
        )
        policy.observe_attention(layer.layer_idx, features, attn_sum, attn_last)
    else:
        out = slot_attention.prompt_attention(
            query, key, value, None if plain else mask, scaling, softcap, sinks
        )
    keep = select_prompt_tokens(
        settings, policy, layer.layer_idx, query, key, value, real, positions, capacity, features, window
    )
    layer.allocate(key, value, keep, features, capacity, positions)
    return out


def select_prompt_tokens(
    settings: CacheSettings,
    policy: EvictionPolicy,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    real: torch.Tensor,
    positions: torch.Tensor,
    capacity: torch.Tensor,
    features: dict[str, torch.Tensor],
    sliding_window: int | None = None,
) -> torch.Tensor:
    """(B, H, L) bool: which prompt tokens to keep, at most ``capacity`` (B,) per row.

    Everything fits: every real token. Else ``streaming`` (and a non-evicting policy) keeps the first
    ``sink`` and the most recent; ``window`` keeps sink + recent and the policy's best-scored tokens.
    A sliding layer (``sliding_window`` W) considers only the tokens the next query sees (positions
    after ``next - W``) and keeps no sink tokens.
    """
    batch, heads, length, _ = key.shape
    real = real[:, None, :].expand(batch, heads, length)
    pos = positions[:, None, :]
    real_len = real[:, 0].sum(-1)[:, None, None]  # also the position of the next token
    sink = settings.sink
    if sliding_window is not None:
        real = real & (pos > real_len - sliding_window)
        sink = 0
    cap = capacity[:, None, None]
    if bool((real.sum(-1) <= cap).all()):
        return real  # everything fits: nothing to score
    if settings.prefill != "window" or not policy.evicts:
        return real & ((pos < sink) | (pos >= real_len - (cap - sink)))
    window = min(settings.window, length)
    view = SlotView(
        layer_idx=layer_idx,
        keys=key,
        values=value,
        valid=real,
        features=features,
        queries=query[:, :, -window:],
        new_keys=key[:, :, -window:],
        new_features={name: f[:, :, -window:] for name, f in features.items()},
        probe_valid=real[:, 0, -window:],
    )
    score = policy.score(view).float()
    protected = (pos < sink) | (pos >= real_len - settings.recent)
    score = torch.where(real, score, -math.inf).masked_fill(real & protected, math.inf)
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(length, device=key.device).expand_as(order)
    )
    return real & (rank < cap)
