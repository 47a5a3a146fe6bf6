"""Decode attention that also returns each slot's attention probability (H2O, TOVA), without a
second attention pass in torch and without materialising the weights.

`decode_attention_with_stats` runs the split-KV Triton kernels of `lshe.kernels.decode_attention`
(the same split kernel, which here also stores every logit it computes, (B x H, G, S) float32; a merge
kernel that also writes each query head's final log-sum-exp), then a light third kernel that turns
the stored logits into probabilities with that log-sum-exp and sums them over the group: (B, H, S)
float32, what `lshe.slot_attention.grouped_attention` returns as ``attention_sum`` for one query
token (within float32 rounding: the normaliser comes from the merged splits instead of one softmax).
Softcap and sinks as in `lshe.kernels.decode_attention`. Reads the keys once; the logits buffer is
G x 4 bytes per slot against the keys' D x 2 (16x less for Llama's group 4, head_dim 128, bf16).

On CPU tensors it runs under Triton's interpreter only (``TRITON_INTERPRET=1``), for tests.
"""

from __future__ import annotations

import torch

from lshe import kernels

triton, tl = kernels.triton, kernels.tl

BLOCK_STATS = 256  # slots per program of the probability kernel


def applies(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether `decode_attention_with_stats` handles these tensors (`lshe.kernels.attention_applies`)."""
    return kernels.attention_applies(query, keys)


def decode_attention_with_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    write: kernels.SlotWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token over the slots, and its probabilities summed per KV group.

    Args: as `lshe.kernels.decode_attention` (valid None: every slot valid); a ``write`` that
        advances its slot is not taken here (evicting policies only need this).
    Returns:
        (B, Hq, 1, D) output in the query's dtype; (B, H, S) float32 attention probability of each
        slot summed over the group's query heads (0 on invalid slots; with sinks, a row's sum is < 1).
    """
    batch, q_heads, _, dim = query.shape
    heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // heads
    g_block = max(16, triton.next_power_of_2(group))
    rows = batch * heads
    block_n = kernels.BLOCK_N
    splits, chunk = kernels.split_slots(rows, slots, query.device)
    device = query.device
    partial = torch.empty(rows, splits, g_block, dim, dtype=torch.float32, device=device)
    lse = torch.empty(rows, splits, g_block, dtype=torch.float32, device=device)
    final_lse = torch.empty(rows, g_block, dtype=torch.float32, device=device)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a number > 0 or None, got {softcap!r}")
    if sinks is not None:
        if sinks.shape != (q_heads,):
            raise ValueError(f"sinks must have shape ({q_heads},), got {tuple(sinks.shape)}")
        sinks = sinks.to(device=device, dtype=torch.float32).contiguous()
    masked = valid is not None
    valid_bytes = valid.view(torch.uint8) if masked else keys  # any pointer when unmasked
    ieee = query.dtype == torch.float32
    cap = 1.0 if softcap is None else float(softcap)
    out = torch.empty(batch, q_heads, 1, dim, dtype=query.dtype, device=device)
    attention = torch.empty(batch, heads, slots, dtype=torch.float32, device=device)
    logits = torch.empty(rows, group, slots, dtype=torch.float32, device=device)  # the split kernel's
    if write is not None and write.advance_slot:
        raise ValueError("decode_attention_with_stats does not advance a write's slot")
    write_args, write_flags, apart = kernels.write_arguments(write, keys, values, rows, splits, out)
    with kernels.on_device(device):
        kernels._attention_split_kernel[(rows, splits)](
            query, query.stride(0), query.stride(1), keys, values, valid_bytes, partial, lse, logits, out,
            heads, slots, chunk, splits, scale, cap, *write_args,
            D=dim, G=group, G_BLOCK=g_block, BLOCK_N=block_n, MASKED=masked, IEEE=ieee,
            SOFTCAP=softcap is not None, LOGITS=True, DIRECT=False, **write_flags, num_warps=4, num_stages=2,
        )  # fmt: skip
        _merge_lse_kernel[(rows, group)](
            partial, lse, out, final_lse, sinks if sinks is not None else lse, heads, splits,
            D=dim, G=group, G_BLOCK=g_block, SPLITS_BLOCK=max(2, triton.next_power_of_2(splits)),
            SINKS=sinks is not None, num_warps=4,
        )  # fmt: skip
        _probabilities_kernel[(rows, triton.cdiv(slots, BLOCK_STATS))](
            logits, final_lse, attention, slots,
            G=group, G_BLOCK=g_block, BLOCK_N=BLOCK_STATS, num_warps=4,
        )  # fmt: skip
    if apart is not None:
        apart.after_attention()
    return out, attention


if triton is not None:

    @triton.jit
    def _merge_lse_kernel(
        partial_ptr, lse_ptr, out_ptr, final_lse_ptr, sinks_ptr, H, splits,
        D: tl.constexpr, G: tl.constexpr, G_BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
        SINKS: tl.constexpr,
    ):  # fmt: skip
        """`lshe.kernels._attention_merge_kernel`, and the query head's log-sum-exp over all slots (and
        its sink): -inf where nothing is valid."""
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        sp = tl.arange(0, SPLITS_BLOCK)
        d = tl.arange(0, D)
        inside = sp < splits
        lse = tl.load(lse_ptr + (row * splits + sp) * G_BLOCK + g, mask=inside, other=float("-inf"))
        top = tl.max(lse, axis=0)
        if SINKS:
            sink = tl.load(sinks_ptr + (row % H) * G + g)
            top = tl.maximum(top, sink)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp(lse - top_safe)
        parts = tl.load(
            partial_ptr + ((row * splits + sp) * G_BLOCK + g)[:, None] * D + d[None, :],
            mask=inside[:, None],
            other=0.0,
        )
        total = tl.sum(weight, axis=0)
        if SINKS:
            total += tl.exp(sink - top_safe)
        out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + (row * G + g) * D + d, out.to(out_ptr.dtype.element_ty))
        final = tl.where(total == 0.0, float("-inf"), top_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
        tl.store(final_lse_ptr + row * G_BLOCK + g, final)

    @triton.jit
    def _probabilities_kernel(
        logits_ptr, final_lse_ptr, attention_ptr, S,
        G: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Program (row x KV head, block of slots): each slot's probability under the group's query
        heads, exp(logit - lse), summed over the group, from the logits the split kernel stored (-inf
        on invalid slots): the keys are not read a second time."""
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        g = tl.arange(0, G_BLOCK)
        final = tl.load(final_lse_ptr + row * G_BLOCK + g, mask=g < G, other=float("inf"))
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = n < S
        real = (g < G)[:, None] & inside[None, :]
        scores = tl.load(logits_ptr + (row * G + g)[:, None] * S + n[None, :], mask=real, other=float("-inf"))
        usable = real & (scores != float("-inf")) & (final != float("-inf"))[:, None]
        p = tl.where(usable, tl.exp(scores - tl.where(final == float("-inf"), 0.0, final)[:, None]), 0.0)
        tl.store(attention_ptr + row * S + n, tl.sum(p, axis=0), mask=inside)


BLOCK_PROMPT = 64  # queries and keys per tile of the prompt statistics kernel


def prompt_attention_stats(
    query: torch.Tensor, key: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot attention statistics of a causal prompt, flash-style: no (queries x keys) weights.

    For a prompt without padding, sliding window, softcap or sinks (the caller checks): query
    (B, Hq, L, D), key (B, H, L, D). Per tile of queries, one pass over the keys finds each query's
    log-sum-exp and a second adds exp(logit - lse), summed over the tile's queries, into the slots'
    totals with atomic adds (so the summation order, and the last float32 bits, vary between runs).
    The output itself is SDPA's (the caller's). Returns (B, H, L) float32 each: the attention
    summed over each group's query heads and all queries, and the same for the last query only, as
    `lshe.slot_attention.grouped_attention` returns them.
    """
    batch, q_heads, length, dim = query.shape
    heads = key.shape[1]
    group = q_heads // heads
    device = query.device
    attn_sum = torch.zeros(batch, heads, length, dtype=torch.float32, device=device)
    attn_last = torch.zeros(batch, heads, length, dtype=torch.float32, device=device)
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("query and key must be contiguous in their last dimension")
    grid = (triton.cdiv(length, BLOCK_PROMPT), batch * heads, group)
    with kernels.on_device(device):
        _prompt_stats_kernel[grid](
            query, query.stride(0), query.stride(1), query.stride(2),
            key, key.stride(0), key.stride(1), key.stride(2),
            attn_sum, attn_last, heads, length, scale,
            D=dim, G=group, BLOCK_M=BLOCK_PROMPT, BLOCK_N=BLOCK_PROMPT, IEEE=query.dtype == torch.float32,
            num_warps=4,
        )  # fmt: skip
    return attn_sum, attn_last


if triton is not None:

    @triton.jit
    def _prompt_stats_kernel(
        q_ptr, q_sb, q_sh, q_sl, k_ptr, k_sb, k_sh, k_sl, sum_ptr, last_ptr, H, L, scale,
        D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Program (tile of queries, row x KV head, query head of the group): causal lse of each query
        of the tile, then its probabilities summed over the tile into the slots' totals."""
        tile = tl.program_id(0)
        pid = tl.program_id(1)
        g = tl.program_id(2)
        b = pid // H
        h = pid % H
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q_rows = q_ptr + b.to(tl.int64) * q_sb + (h * G + g) * q_sh + m.to(tl.int64)[:, None] * q_sl
        q = tl.load(q_rows + d[None, :], mask=m[:, None] < L, other=0.0)
        k_base = k_ptr + b.to(tl.int64) * k_sb + h * k_sh
        hi = tl.minimum((tile + 1) * BLOCK_M, L)  # causal: later keys see none of this tile
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in tl.range(0, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + n.to(tl.int64)[:, None] * k_sl + d[None, :], mask=n[:, None] < L, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where((n[None, :] <= m[:, None]) & (n[None, :] < L), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
        real = m < L
        lse = tl.where(real, m_i + tl.log(tl.where(real, l_i, 1.0)), float("inf"))
        for n0 in tl.range(0, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + n.to(tl.int64)[:, None] * k_sl + d[None, :], mask=n[:, None] < L, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            ok = (n[None, :] <= m[:, None]) & (n[None, :] < L) & real[:, None]
            p = tl.where(ok, tl.exp(s - tl.where(real, lse, 0.0)[:, None]), 0.0)
            inside = n < L
            tl.atomic_add(sum_ptr + pid.to(tl.int64) * L + n, tl.sum(p, axis=0), mask=inside)
            if (tile + 1) * BLOCK_M >= L:  # the tile holding the last query
                last = tl.sum(tl.where((m == L - 1)[:, None], p, 0.0), axis=0)
                tl.atomic_add(last_ptr + pid.to(tl.int64) * L + n, last, mask=inside)


def prompt_applies(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `prompt_attention_stats` handles these tensors (CUDA, power-of-two head dim >= 16)."""
    dim = key.shape[-1]
    return (
        triton is not None
        and query.is_cuda
        and dim >= 16
        and dim & (dim - 1) == 0
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )
