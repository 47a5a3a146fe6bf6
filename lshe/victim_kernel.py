"""Two Triton launches from a policy's scores to its victims: protected argmin, mark valid, push recent.

Every attention-free policy that scores slots with a few torch operations (random, knorm, streaming,
a user's) ends its decode step with the same rule (`lshe.victims.protected_argmin`): an empty usable
slot first, else the lowest score among usable slots that are neither sink slots nor among the
``recent`` last written ones, ties to the lowest slot. In torch that is about eight kernels (pad,
fills, scatter, masks, argmin) plus three for the writes (validity, recent list); on a GPU at batch 1
each is a launch doing almost no work. `protected_argmin_write` does all of it in two: programs that
each scan a chunk of one (row, KV head)'s slots (enough of them to fill the GPU at batch 1), then one
program per (row, KV head) that reduces the chunks and writes; the policy's features are written by
the layer (`EvictingLayer.write_features`), since only the policy knows them.

A policy whose score is one stored feature (`policies.base.StoredScore`: knorm's minus norm,
streaming's position, random's hash of the positions) passes a `FeatureScore` instead of scores: the
kernel computes the score while it scans, and writes the new token's feature into the victim slot, so
no (B, H, S) score tensor is built and read back, and no feature scatter runs.

Exactly the torch rule's victims: the same float32 scores (a sign flip, an exact integer-to-float
conversion, or the same splitmix64 integer arithmetic), then only comparisons
(`tests/test_victim_kernel.py`, on a GPU, or on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lshe import kernels

try:  # triton ships with CUDA builds of torch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

BLOCK = 1024  # at most this many slots one program compares per iteration (8 per thread at 4 warps)
PROGRAMS = 512  # programs to aim for over all (row, KV head) pairs (an H200 has 132 SMs)


def interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors, slowly."""
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def applies(score: torch.Tensor) -> bool:
    """Whether `protected_argmin_write` runs for these scores (CUDA with triton)."""
    return triton is not None and score.is_cuda


@dataclass(frozen=True)
class FeatureScore:
    """Scores the kernel computes from one stored feature while it scans the slots (no score tensor):
    ``sign * feature`` in float32, or with ``hash_base`` set, `policies.random.hash_scores` of the
    feature as slot positions and ``new_value`` as the new token's position (both int64; see
    `policies.random.hash_base`); ``new_value`` (B, H, 1) is written into the victim slot of ``feature`` (B, H, S,
    contiguous) with the validity and recent-list writes."""

    feature: torch.Tensor
    new_value: torch.Tensor
    sign: float = 1.0
    hash_base: int | None = None  # the hash chain after (seed, layer), an unsigned 64-bit integer


def protected_argmin_write(
    score: torch.Tensor | FeatureScore,
    valid: torch.Tensor,
    usable: torch.Tensor,
    recent_slots: torch.Tensor,
    sink: int,
    write: bool = True,
) -> torch.Tensor:
    """The victims of ``score`` (B, H, S) under the protected-argmin rule; with ``write``, also mark
    them valid and push them onto ``recent_slots`` (in place, as `EvictingLayer.write_state` does).

    Args:
        score: (B, H, S) keep-scores (any float dtype; compared as float32), or a `FeatureScore`
            (then ``write`` also stores its new value in the victim slot of its feature).
        valid: (B, H, S) bool, contiguous; usable: (B or 1, 1, S) bool; recent_slots: (B, H, R)
            int64, contiguous, S meaning none; sink: slots below it are protected.
    Returns:
        (B, H, 1) int64 victim slots.
    """
    batch, heads, slots = valid.shape
    recent = recent_slots.shape[-1]
    if not valid.is_contiguous() or not recent_slots.is_contiguous():
        raise ValueError("valid and recent_slots must be contiguous")
    if usable.shape[-1] != slots or usable.shape[1] != 1 or usable.stride(-1) != 1:
        raise ValueError(f"usable must be a (B or 1, 1, {slots}) bool tensor, contiguous in slots")
    stored = score if isinstance(score, FeatureScore) else None
    if stored is None:
        score = score.float().contiguous()
        feature, new_value, mode, base = score, score, 0, 0
    else:
        feature = stored.feature
        if feature.shape != valid.shape or not feature.is_contiguous():
            raise ValueError(f"a FeatureScore's feature must be contiguous, of shape {tuple(valid.shape)}")
        if stored.new_value.shape != (batch, heads, 1):
            raise ValueError(f"a FeatureScore's new value must be of shape {(batch, heads, 1)}")
        mode = 1 if stored.hash_base is None else 2
        base = stored.hash_base or 0
        if mode == 2 and (feature.dtype != torch.int64 or stored.new_value.dtype != torch.int64):
            raise ValueError("a hashed FeatureScore needs int64 positions (slots and new token)")
        new_value = stored.new_value.to(feature.dtype).contiguous()
    slot = torch.empty(batch, heads, 1, dtype=torch.int64, device=valid.device)
    # Split each (row, KV head)'s slots over several programs so that a small batch still fills the
    # GPU (8 programs scanning 10k slots each were latency-bound); a second launch reduces the parts.
    want = triton.cdiv(slots, triton.cdiv(PROGRAMS, batch * heads))  # slots per program, ideally
    block = min(BLOCK, max(16, triton.next_power_of_2(want)))
    chunk = triton.cdiv(want, block) * block
    split = triton.cdiv(slots, chunk)
    part_key = torch.empty(batch * heads, split, dtype=torch.float32, device=valid.device)
    part_slot = torch.empty(batch * heads, split, dtype=torch.int32, device=valid.device)
    device = valid.device
    with kernels.on_device(device):
        _partial_argmin_kernel[(batch * heads, split)](
            feature, valid.view(torch.uint8), usable.view(torch.uint8), usable.stride(0) if usable.shape[0] > 1 else 0,
            recent_slots, part_key, part_slot, heads, slots, sink, chunk, split,
            new_value, base >> 32, base & 0xFFFFFFFF,
            R=recent, BLOCK=block, MODE=mode, NEGATE=stored is not None and stored.sign < 0, num_warps=4,
        )  # fmt: skip
        _reduce_write_kernel[(batch * heads,)](
            part_key, part_slot, valid.view(torch.uint8), recent_slots, slot, slots, split, feature, new_value,
            R=recent, R_BLOCK=max(2, triton.next_power_of_2(recent)), S_BLOCK=max(2, triton.next_power_of_2(split)),
            WRITE=write, WRITE_FEATURE=write and stored is not None, num_warps=1,
        )  # fmt: skip
    return slot


if triton is not None:

    @triton.jit
    def _splitmix64_u64(x):
        """splitmix64 of uint64 ``x`` (unsigned: logical shifts, products wrap mod 2**64)."""
        x = x + 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    # base_hi / base_lo are never specialised: Triton would make a value of 1 a constant without `.to`.
    @triton.jit(do_not_specialize=["base_hi", "base_lo"])
    def _partial_argmin_kernel(
        score_ptr, valid_ptr, usable_ptr, usable_sb, recent_ptr, part_key_ptr, part_slot_ptr,
        heads, slots, sink, chunk, split, new_ptr, base_hi, base_lo,
        R: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, NEGATE: tl.constexpr,
    ):  # fmt: skip
        """The lowest key of one chunk of one (row, KV head)'s slots and the first slot holding it.

        MODE 0: ``score_ptr`` holds float32 scores; 1: a stored feature, negated with NEGATE; 2: int64
        slot positions, hashed as `policies.random.hash_scores` (the chain continues from base_hi/lo
        with the KV head and the new token's position ``new_ptr[row]``)."""
        row = tl.program_id(0)  # b * heads + h
        part = tl.program_id(1)
        b = row // heads
        if MODE == 2:
            h = (base_hi.to(tl.uint64) << 32) | base_lo.to(tl.uint64)
            h = _splitmix64_u64(h ^ (row % heads).to(tl.uint64))
            h = _splitmix64_u64(h ^ tl.load(new_ptr + row).to(tl.uint64, bitcast=True))
        lanes = tl.arange(0, BLOCK)
        # Per lane: the lowest key seen and the first slot that had it (blocks go up, so a strict
        # "<" keeps the lowest slot among equal keys). A +inf key is never recorded.
        best = tl.full([BLOCK], float("inf"), tl.float32)
        best_slot = tl.full([BLOCK], 2147483647, tl.int32)
        begin = part * chunk
        for start in range(begin, begin + chunk, BLOCK):
            offs = start + lanes
            inside = offs < slots
            if MODE == 0:
                s = tl.load(score_ptr + row * slots + offs, mask=inside, other=0.0)
            elif MODE == 1:
                s = tl.load(score_ptr + row * slots + offs, mask=inside, other=0).to(tl.float32)
                if NEGATE:
                    s = -s
            else:
                cached = tl.load(score_ptr + row * slots + offs, mask=inside, other=0)
                hashed = _splitmix64_u64(h ^ cached.to(tl.uint64, bitcast=True))
                s = (hashed >> 40).to(tl.float32) / 16777216.0
            v = tl.load(valid_ptr + row * slots + offs, mask=inside, other=0) != 0
            u = tl.load(usable_ptr + b * usable_sb + offs, mask=inside, other=0) != 0
            protected = offs < sink
            for i in tl.static_range(R):  # R scalar loads (cached), not a (BLOCK x R) int64 comparison
                protected = protected | (offs == tl.load(recent_ptr + row * R + i).to(tl.int32))
            key = tl.where(v, tl.where(protected, float("inf"), s), float("-inf"))
            key = tl.where(u & inside, key, float("inf"))
            better = key < best
            best = tl.where(better, key, best)
            best_slot = tl.where(better, offs, best_slot)
        low = tl.min(best, axis=0)
        tl.store(part_key_ptr + row * split + part, low)
        tl.store(
            part_slot_ptr + row * split + part, tl.min(tl.where(best == low, best_slot, 2147483647), axis=0)
        )

    @triton.jit
    def _reduce_write_kernel(
        part_key_ptr, part_slot_ptr, valid_ptr, recent_ptr, slot_ptr, slots, split, feature_ptr, new_ptr,
        R: tl.constexpr, R_BLOCK: tl.constexpr, S_BLOCK: tl.constexpr, WRITE: tl.constexpr,
        WRITE_FEATURE: tl.constexpr,
    ):  # fmt: skip
        """The lowest key over the chunks (ties to the lowest slot); then mark it valid, push it
        recent, and with WRITE_FEATURE store the row's new feature value in it."""
        row = tl.program_id(0)
        parts = tl.arange(0, S_BLOCK)
        key = tl.load(part_key_ptr + row * split + parts, mask=parts < split, other=float("inf"))
        where = tl.load(part_slot_ptr + row * split + parts, mask=parts < split, other=2147483647)
        low = tl.min(key, axis=0)
        victim = tl.min(tl.where(key == low, where, 2147483647), axis=0)
        victim = tl.where(victim == 2147483647, 0, victim)  # every key +inf: slot 0, as torch's argmin
        tl.store(slot_ptr + row, victim.to(tl.int64))
        if WRITE:
            tl.store(valid_ptr + row * slots + victim, 1)
            if WRITE_FEATURE:
                tl.store(feature_ptr + row * slots + victim, tl.load(new_ptr + row))
            r_offs = tl.arange(0, R_BLOCK)
            if R > 0:
                shifted = tl.load(recent_ptr + row * R + r_offs + 1, mask=r_offs < R - 1, other=0)
                pushed = tl.where(r_offs == R - 1, victim.to(tl.int64), shifted)
                tl.debug_barrier()
                tl.store(recent_ptr + row * R + r_offs, pushed, mask=r_offs < R)
