"""A fused Triton kernel for LSH-E's decode step (CUDA only; the torch path in `lshe.cache` is the fallback).

Per layer and decode step the torch path runs about thirty small operations (hash the probe, hash the
new key, XOR, popcount lookup, sums, protection mask, argmin, four scatters). On a GPU each is a
kernel launch of a few microseconds doing almost no work, which is what makes eviction expensive at
batch 1. `fused_lshe_step` does all of it in one launch, one program per (row, KV head):

1. SimHash the probe (the group's query heads, or the new key) and the new key with the layer's
   projection, in float32, packed to integers (bit ``j`` of the code is bit ``j % 8`` of byte
   ``j // 8``, as `lshe.hashing.pack_bits` stores it);
2. scan the slots' packed codes in blocks: Hamming distance (summed over the group's query heads),
   empty usable slots first, protected (sink, the ``recent`` last written) or unusable slots never;
   keep the running maximum, ties to the lowest slot;
3. write the new key's code into the victim slot, mark it valid, and push it onto the recent list.

The victims are the torch path's (`tests/test_kernels.py` checks it) with one caveat: a projection
within float32 rounding of zero can give its sign bit differently, since the dot products are summed
in another order. Keys and values are written by the cache afterwards, exactly as for every policy.
Greedy scores only (``score_decay == 0``) and codes of at most 32 bits; anything else, and every CPU
tensor, takes the torch path.
"""

from __future__ import annotations

import torch

from policies.lshe import LSHEPolicy

try:  # triton ships with CUDA builds of torch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

MAX_BITS = 32  # codes are handled as one int32 per slot


def available() -> bool:
    """True when the fused kernel can run: triton is installed and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


def applies(policy, query: torch.Tensor) -> bool:
    """Whether `fused_lshe_step` handles this policy and query (else the cache's torch path runs)."""
    return (
        triton is not None
        and query.is_cuda
        and type(policy) is LSHEPolicy
        and policy.score_decay == 0
        and policy.proj_dim <= MAX_BITS
    )


def fused_lshe_step(layer, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """Choose this step's slots for an LSH-E layer and update its codes, validity and recent list.

    Args:
        layer: an `lshe.cache.EvictingLayer` after prefill.
        query: (B, Hq, 1, D) this step's queries; key: (B, H, 1, D) this step's keys (post-RoPE).
    Returns:
        (B, H, 1) int64 slots to overwrite with the new keys and values, or None when the kernel
        does not apply (`applies`), in which case nothing was changed.
    """
    policy = layer.policy
    if not applies(policy, query):
        return None
    projection = policy.projection(layer.layer_idx, query.shape[-1], query.device)
    return lshe_step(
        query,
        key,
        projection,
        layer.features["codes"],
        layer.valid,
        layer.usable,
        layer.recent_slots,
        layer.cache.sink,
        probe_query=policy.probe == "query",
    )


def lshe_step(
    query: torch.Tensor,
    key: torch.Tensor,
    projection: torch.Tensor,
    codes: torch.Tensor,
    valid: torch.Tensor,
    usable: torch.Tensor,
    recent_slots: torch.Tensor,
    sink: int,
    probe_query: bool = True,
) -> torch.Tensor:
    """Launch the fused kernel on raw tensors; ``codes``, ``valid`` and ``recent_slots`` change in place.

    Args:
        query: (B, Hq, 1, D); key: (B, H, 1, D); projection: (D, m) float32, m <= 32.
        codes: (B, H, S, ceil(m / 8)) uint8, contiguous; valid: (B, H, S) bool, contiguous.
        usable: (B or 1, 1, S) bool; recent_slots: (B, H, R) int64, contiguous (S = no slot).
        sink: slots below this index are protected.
        probe_query: hash the query heads of each group (else the new key) as the probe.
    Returns:
        (B, H, 1) int64 victim slots.
    """
    batch, heads, slots, n_bytes = codes.shape
    dim, bits = projection.shape
    group = query.shape[1] // heads
    recent = recent_slots.shape[-1]
    if bits > MAX_BITS or n_bytes != (bits + 7) // 8:
        raise ValueError(f"the fused kernel takes codes of at most {MAX_BITS} bits, got {bits}")
    for name, t in (("codes", codes), ("valid", valid), ("recent_slots", recent_slots)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("query and key must be contiguous in their last dimension")
    slot = torch.empty(batch, heads, 1, dtype=torch.int64, device=codes.device)
    usable = usable.view(torch.uint8)
    block_s = min(2048, triton.next_power_of_2(slots))
    _lshe_step_kernel[(batch * heads,)](
        query, query.stride(0), query.stride(1),
        key, key.stride(0), key.stride(1),
        projection,
        codes, valid.view(torch.uint8), usable, usable.stride(0) if usable.shape[0] > 1 else 0,
        recent_slots, slot,
        heads, slots, sink,
        D=dim, D_BLOCK=triton.next_power_of_2(dim),
        M=bits, M_BLOCK=max(2, triton.next_power_of_2(bits)), NB=n_bytes,
        G=group, G_BLOCK=max(2, triton.next_power_of_2(group)),
        R=recent, R_BLOCK=max(2, triton.next_power_of_2(recent)),
        PROBE_QUERY=probe_query, BLOCK_S=block_s,
        num_warps=8,
    )  # fmt: skip
    return slot


if triton is not None:

    @triton.jit
    def _popcount32(x):
        """Set bits of each int32 (SWAR; exact for negative values too)."""
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        return x & 0x3F

    @triton.jit
    def _lshe_step_kernel(
        q_ptr, q_sb, q_sh,
        k_ptr, k_sb, k_sh,
        proj_ptr,
        codes_ptr, valid_ptr, usable_ptr, usable_sb,
        recent_ptr, slot_ptr,
        H, S, sink,
        D: tl.constexpr, D_BLOCK: tl.constexpr,
        M: tl.constexpr, M_BLOCK: tl.constexpr, NB: tl.constexpr,
        G: tl.constexpr, G_BLOCK: tl.constexpr,
        R: tl.constexpr, R_BLOCK: tl.constexpr,
        PROBE_QUERY: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        row = pid.to(tl.int64)  # (b * H + h): index of this (row, KV head)
        d = tl.arange(0, D_BLOCK)
        m = tl.arange(0, M_BLOCK)
        proj = tl.load(
            proj_ptr + d[:, None] * M + m[None, :], mask=(d[:, None] < D) & (m[None, :] < M), other=0.0
        )
        bit_value = tl.where(m < M, 1 << m, 0)  # int32; bit 31 wraps to the sign bit, as intended

        # SimHash of the new key (stored) and of the probe.
        k = tl.load(k_ptr + b * k_sb + h * k_sh + d, mask=d < D, other=0.0).to(tl.float32)
        k_proj = tl.sum(k[:, None] * proj, axis=0)
        k_code = tl.sum(tl.where(k_proj >= 0, bit_value, 0), axis=0)
        g = tl.arange(0, G_BLOCK)
        if PROBE_QUERY:
            q = tl.load(
                q_ptr + b * q_sb + (h * G + g)[:, None] * q_sh + d[None, :],
                mask=(g[:, None] < G) & (d[None, :] < D),
                other=0.0,
            ).to(tl.float32)
            q_proj = tl.sum(q[:, :, None] * proj[None, :, :], axis=1)  # (G_BLOCK, M_BLOCK)
            q_code = tl.sum(tl.where(q_proj >= 0, bit_value[None, :], 0), axis=1)  # (G_BLOCK,)

        r = tl.arange(0, R_BLOCK)
        recent = tl.load(recent_ptr + row * R + r, mask=r < R, other=-1)

        best_value = -1
        best_slot = 0
        for start in tl.range(0, S, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            inside = s < S
            code = tl.zeros([BLOCK_S], dtype=tl.int32)
            for j in tl.static_range(NB):
                byte = tl.load(codes_ptr + (row * S + s) * NB + j, mask=inside, other=0)
                code = code | (byte.to(tl.int32) << (8 * j))
            if PROBE_QUERY:
                distance = tl.sum(
                    tl.where(g[:, None] < G, _popcount32(q_code[:, None] ^ code[None, :]), 0), axis=0
                )
            else:
                distance = _popcount32(k_code ^ code)
            valid = tl.load(valid_ptr + row * S + s, mask=inside, other=0) != 0
            usable = tl.load(usable_ptr + b * usable_sb + s, mask=inside, other=0) != 0
            protected = s < sink
            for i in tl.static_range(R):
                protected = protected | (s == tl.load(recent_ptr + row * R + i))
            priority = tl.where(valid, distance, 1 << 30)  # empty slots first
            priority = tl.where((valid & protected) | (usable == 0), -1, priority)
            priority = tl.where(inside, priority, -2)
            block_best = tl.max(priority, axis=0)
            block_slot = tl.argmax(priority, axis=0, tie_break_left=True)
            take = block_best > best_value  # strictly: an earlier block keeps its ties
            best_slot = tl.where(take, start + block_slot, best_slot)
            best_value = tl.where(take, block_best, best_value)

        victim = best_slot.to(tl.int64)
        tl.store(slot_ptr + row, victim)
        for j in tl.static_range(NB):
            tl.store(codes_ptr + (row * S + victim) * NB + j, ((k_code >> (8 * j)) & 0xFF).to(tl.uint8))
        tl.store(valid_ptr + row * S + victim, tl.full([], 1, tl.uint8))
        if R > 0:
            # recent <- recent[1:] + [victim], shifted in registers (loaded before the scan).
            shifted = tl.sum(tl.where(r[None, :] == r[:, None] + 1, recent[None, :], 0), axis=1)
            shifted = tl.where(r == R - 1, victim, shifted)
            tl.store(recent_ptr + row * R + r, shifted, mask=r < R)
