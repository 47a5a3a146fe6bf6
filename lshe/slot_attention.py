"""Attention over the evicting cache's slots: fused SDPA or Triton, or explicit weights for policies
that need them (`EvictionPolicy.needs_attention`).

Every attention the cache computes goes through this module, so a test can watch (or forbid) each
kind by patching `scaled_dot_product_attention` or `grouped_attention` here.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import scaled_dot_product_attention

from lshe import kernels

ATTENTION_CHUNK = 512  # queries per chunk when attention weights must be materialised


def prompt_attention(
    query,
    key,
    value,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a prompt over itself: (B, Hq, L, D) -> (B, Hq, L, D).

    ``mask`` (B, 1, L, L) bool where the prompt has padding or a sliding window, else None (plain
    causal SDPA). With a logit ``softcap`` or attention ``sinks`` (which SDPA lacks) the weights are
    explicit, so ``mask`` is then required.
    """
    if softcap is not None or sinks is not None:
        if mask is None:
            raise ValueError("prompt_attention with a softcap or sinks needs the explicit causal mask")
        return grouped_attention(query, key, value, mask, scaling, softcap=softcap, sinks=sinks)[0]
    if mask is None:
        return scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    all_valid: bool,
    scaling: float,
    fused: bool,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    write: kernels.SlotWrite | None = None,
) -> torch.Tensor:
    """Fused attention of one query token over the valid slots: (B, Hq, 1, D) -> (B, Hq, 1, D).

    On CUDA (``fused``): the split-KV Triton kernel `lshe.kernels.decode_attention`, with the
    validity mask only while some slot is empty (``all_valid`` is known on the host). Otherwise SDPA:
    with one query token the query heads of a KV group act as ``group`` queries of that KV head, so
    no GQA expansion of the keys is needed and the (B, H, 1, S) validity mask broadcasts over them.
    A logit ``softcap`` and attention ``sinks`` run in the Triton kernel, else through explicit
    weights (SDPA has neither). A ``write`` (the step's writes, `kernels.SlotWrite`) is done by the
    Triton launch, which must then be the one that runs.
    """
    if fused and kernels.attention_applies(query, keys):  # split-KV Triton kernel
        valid = None if all_valid else valid
        return kernels.decode_attention(query, keys, values, valid, scaling, softcap, sinks, write)
    if write is not None:
        raise ValueError(
            "a SlotWrite needs the Triton attention (fused=True, CUDA, a power-of-two head size)"
        )
    if softcap is not None or sinks is not None:
        mask = valid[:, :, None, :]
        return grouped_attention(query, keys, values, mask, scaling, softcap=softcap, sinks=sinks)[0]
    if query.is_cuda and all_valid:  # flash attention handles GQA itself
        return scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=True)
    batch, heads, slots = valid.shape
    dim = query.shape[-1]
    group = query.shape[1] // heads
    q = query.reshape(batch, heads, group, dim)
    if all_valid:
        out = scaled_dot_product_attention(q, keys, values, scale=scaling)
    else:
        out = scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, :, None, :], scale=scaling)
    return out.reshape(batch, heads * group, 1, dim)


def grouped_attention(
    query,
    key,
    value,
    mask,
    scaling,
    chunk: int = ATTENTION_CHUNK,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """Attention with explicit weights, GQA-aware, chunked over queries.

    Args:
        query: (B, Hq, Q, D); key, value: (B, H, S, D); mask: bool broadcastable to (B, H, Q, S).
        softcap: logit soft-capping: scaled logits x become ``softcap * tanh(x / softcap)``.
        sinks: (Hq,) attention sinks (gpt-oss's ``s_aux``): one extra logit per query head joins
            every softmax and is dropped after it, so the weights of a row sum to less than 1.
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
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.masked_fill(~mask[:, :, None, start:stop], -math.inf)
        if sinks is not None:
            sink = sinks.float().reshape(1, heads, group, 1, 1).expand(*logits.shape[:4], 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        attn_sum += probs.sum(dim=(2, 3))
        outs.append(torch.einsum("bhgqs,bhsd->bhgqd", probs.to(value.dtype), value))
    out = torch.cat(outs, dim=3).reshape(batch, q_heads, q_len, dim)
    attn_last = probs[:, :, :, -1].sum(dim=2)
    return out, attn_sum, attn_last
