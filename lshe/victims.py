"""Victim choice in few torch operations: the protected argmin every policy's decode step ends with,
and LSH-E's whole decode step without a popcount table (the CPU fast path).

Why: on a CPU a decode step's eviction is a chain of small operations on tensors of a few hundred
slots, each costing a few microseconds of dispatch, and LSH-E's 65536-entry popcount table
(`lshe.hashing.hamming`) misses the caches once attention has streamed the keys through them. Both
functions here choose exactly the victims of the generic path in `lshe.layer.EvictingLayer`
(`tests/test_victims.py` compares them on random states):

* `protected_argmin`: the slot each (row, KV head) overwrites given the policy's scores: an empty
  usable slot first, else the lowest-scoring slot that is neither a sink slot nor one of the
  ``recent`` last written slots, ties to the lowest slot index;
* `lshe_torch_step`: LSH-E's decode step (greedy scores, any ``proj_dim``): the Hamming distance
  summed over a group's probes is ``sum_j c_j + sum_j bit_kj * (G - 2 c_j)``, where ``c_j`` counts
  the probes with bit ``j`` set, so what each byte of a slot's code adds is a 256-entry table per
  (row, KV head, byte), and the slots cost one gather; every number involved is a small integer,
  exact in float32.
"""

from __future__ import annotations

import math

import torch

_BYTE_BITS: dict[torch.device, torch.Tensor] = {}
_PACK: dict[tuple[int, torch.device], torch.Tensor] = {}
_OFFSETS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """(16, 256) float32: row 2j is bit j of each byte value v, row 2j + 1 is 1 - that bit."""
    if device not in _BYTE_BITS:
        bit = (torch.arange(256)[None, :] >> torch.arange(8)[:, None]) & 1  # (8, 256)
        _BYTE_BITS[device] = torch.stack([bit, 1 - bit], dim=1).reshape(16, 256).float().to(device)
    return _BYTE_BITS[device]


def _signs_offsets(probes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(2,) float32 (1, -1) and (probes, 0), cached: ``c * signs - offsets`` = (c - probes, -c)."""
    key = (probes, torch.device(device))
    if key not in _OFFSETS:
        _OFFSETS[key] = (
            torch.tensor([1.0, -1.0], device=device),
            torch.tensor([float(probes), 0.0], device=device),
        )
    return _OFFSETS[key]


def _pack_matrix(bits: int, device: torch.device) -> torch.Tensor:
    """(bits, n_bytes) float32 with 2**(j % 8) at (j, j // 8): sign bits @ it = the packed code bytes."""
    key = (bits, torch.device(device))
    if key not in _PACK:
        j = torch.arange(bits)
        pack = torch.zeros(bits, (bits + 7) // 8)
        pack[j, j // 8] = (2.0 ** (j % 8)).float()
        _PACK[key] = pack.to(device)
    return _PACK[key]


def unusable_mask(layer) -> torch.Tensor:
    """(B, 1, S) bool: ``~layer.usable``, computed once per ``usable`` tensor (it is replaced, never
    changed in place, when a layer's capacity changes: `extend`, `grow`, row moves)."""
    cached = getattr(layer, "_unusable", None)
    if cached is None or cached[0] is not layer.usable:
        cached = (layer.usable, ~layer.usable)
        layer._unusable = cached
    return cached[1]


def protected_argmin(
    score: torch.Tensor,
    valid: torch.Tensor,
    unusable: torch.Tensor,
    recent_slots: torch.Tensor,
    sink: int,
    all_valid: bool,
) -> torch.Tensor:
    """(B, H, 1) int64 victims: an empty usable slot first, else the lowest ``score`` among usable,
    unprotected slots (sink slots ``< sink`` and ``recent_slots`` are protected), ties to the lowest
    slot. ``score`` (B, H, S) is not changed; ``unusable`` (B or 1, 1, S) bool; ``recent_slots``
    (B, H, R) int64 with S meaning none; ``all_valid``: every slot is known to be valid (skips the
    empty-slot mask). Same victims as ``argmin(where(valid, score, -inf) with +inf where (valid and
    protected) or unusable)``, the generic rule of `lshe.layer.EvictingLayer.choose_slot`."""
    slots = score.shape[-1]
    score = score if score.dtype == torch.float32 else score.float()
    masked = torch.nn.functional.pad(score, (0, 1))  # a copy, with a column for "no slot" (= S)
    if sink:
        masked[..., :sink] = math.inf
    if recent_slots.shape[-1]:
        masked.scatter_(2, recent_slots, math.inf)
    masked = masked[..., :slots]
    if not all_valid:  # (all valid: every slot is usable, since slots are only written where usable)
        masked.masked_fill_(~valid, -math.inf)  # empty slots first, protected or not
        masked.masked_fill_(unusable, math.inf)  # never a slot beyond the row's capacity
    return masked.argmin(dim=-1, keepdim=True)


def push_recent(recent_slots: torch.Tensor, slot: torch.Tensor) -> None:
    """Drop the oldest of the ``recent`` last slots and append ``slot`` (B, H, 1), in place."""
    if recent_slots.shape[-1] > 0:
        recent_slots.copy_(torch.cat([recent_slots[..., 1:], slot], dim=-1))


def lshe_scores(probe_bits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, H, S) float32 minus the Hamming distance of every slot's code to the probes, summed over
    probes: exactly ``-hamming(simhash(probes), codes).sum(probes)`` (`policies.lshe.LSHEPolicy.score`).

    Per code byte a 256-entry table (per row and KV head) holds what each byte value adds, built by
    one small matrix product, so the slots cost one gather and one sum: no popcount table.

    Args:
        probe_bits: (B, H, P, bits) bool, the probes' sign bits (P = the group's query heads, or 1).
        codes: (B, H, S, n_bytes) uint8 packed codes (`lshe.hashing.pack_bits`), n_bytes = ceil(bits / 8).
    """
    batch, heads, slots, n_bytes = codes.shape
    bits = probe_bits.shape[-1]
    ones = probe_bits.sum(dim=2, dtype=torch.float32)  # (B, H, bits): c_j, the probes with bit j set
    if bits != n_bytes * 8:  # padding bits are never set in a code: they add c_j = 0
        ones = torch.nn.functional.pad(ones, (0, n_bytes * 8 - bits))
    # Per bit: what a slot adds to minus the distance with the bit set (c_j - G) and unset (-c_j).
    signs, offsets = _signs_offsets(probe_bits.shape[2], codes.device)
    signed = ones.unsqueeze(-1) * signs - offsets  # (B, H, 8 n_bytes, 2)
    table = signed.reshape(batch, heads, n_bytes, 16) @ _byte_bits(codes.device)  # (B, H, n_bytes, 256)
    index = codes.long().transpose(2, 3)  # (B, H, n_bytes, S)
    per_byte = torch.gather(table, 3, index)
    return per_byte[:, :, 0] if n_bytes == 1 else per_byte.sum(dim=2)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without dispatching anything when it already is (a few microseconds a call)."""
    return x if x.dtype == dtype else x.to(dtype)


def lshe_torch_step(
    query: torch.Tensor,
    key: torch.Tensor,
    projection: torch.Tensor,
    codes: torch.Tensor,
    valid: torch.Tensor,
    unusable: torch.Tensor,
    recent_slots: torch.Tensor,
    sink: int,
    all_valid: bool,
    probe_query: bool = True,
) -> torch.Tensor:
    """LSH-E's greedy decode step in torch operations (any device): hash the probe and the new key,
    choose the victims, store the new codes; ``codes``, ``valid`` and ``recent_slots`` change in place.

    Same arguments as `lshe.kernels.lshe_step` (``unusable`` = ~usable, ``all_valid`` from the host)
    and the same victims and state as the generic torch path of `policies.lshe.LSHEPolicy`: the sign
    bits come from the same matrix products (``x.float() @ projection`` on the same shapes), so they
    are bit-identical, and all distances are exact.

    Returns:
        (B, H, 1) int64 victim slots.
    """
    batch, heads, slots, n_bytes = codes.shape
    bits = projection.shape[1]
    key_bits = (_as(key, projection.dtype) @ projection) >= 0  # (B, H, 1, bits), as token_features
    if probe_query:
        probe = (_as(query, projection.dtype) @ projection) >= 0  # (B, Hq, 1, bits), as LSHEPolicy.distances
        probe = probe.reshape(batch, heads, -1, bits)  # the query heads of a group together
    else:
        probe = key_bits
    score = lshe_scores(probe, codes)
    slot = protected_argmin(score, valid, unusable, recent_slots, sink, all_valid)
    new_code = (key_bits.float() @ _pack_matrix(bits, codes.device)).to(
        torch.uint8
    )  # (B, H, 1, n_bytes), as pack_bits
    codes.scatter_(2, slot[..., None].expand(-1, -1, -1, n_bytes), new_code)
    if not all_valid:
        valid.scatter_(2, slot, True)
    push_recent(recent_slots, slot)
    return slot
