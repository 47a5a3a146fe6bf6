"""SimHash (sign random projection) codes, bit-packed, and their Hamming distances.

hash(x) = the m sign bits of ``x @ P`` (bit = 1 where the projection is >= 0), P a seeded Gaussian
(head_dim, m) matrix. For two vectors at angle theta each bit differs with probability theta / pi, so
the Hamming distance between codes estimates the angle. Codes are packed 8 bits per byte, so a code
of m bits takes ceil(m / 8) bytes per token per KV head (2 bytes at m = 16).
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)
_POPCOUNT16 = torch.tensor([bin(i).count("1") for i in range(65536)], dtype=torch.int32)
_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """The lookup table ``name`` on ``device``, copied there once.

    A per-call ``.to(device)`` would be a host-to-device copy at every decode step: a host
    synchronisation, and an operation a CUDA graph cannot capture.
    """
    key = (name, torch.device(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = {"bits": _BIT_WEIGHTS, "popcount": _POPCOUNT, "popcount16": _POPCOUNT16}[name].to(
            device
        )
    return _ON_DEVICE[key]


def gaussian_projection(head_dim: int, proj_dim: int, seed: int, layer_idx: int) -> torch.Tensor:
    """The seeded (head_dim, proj_dim) float32 Gaussian projection of one layer (on CPU).

    The generator is seeded with (seed, layer) so that every layer gets its own matrix and the same
    seed always gives the same matrices, whatever device the model runs on.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
    return torch.randn(head_dim, proj_dim, generator=generator, dtype=torch.float32)


def sign_bits(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Unpacked code: (..., D) -> (..., m) bool, True where ``x @ projection >= 0``."""
    return (x.to(projection.dtype) @ projection) >= 0


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., m) bool -> (..., ceil(m / 8)) uint8, bit j of byte i is bit 8 * i + j."""
    m = bits.shape[-1]
    n_bytes = (m + 7) // 8
    if m != n_bytes * 8:
        bits = torch.nn.functional.pad(bits, (0, n_bytes * 8 - m))
    bits = bits.reshape(*bits.shape[:-1], n_bytes, 8).to(torch.uint8)
    return (bits * _table("bits", bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(codes: torch.Tensor, m: int) -> torch.Tensor:
    """(..., n_bytes) uint8 -> (..., m) bool; the inverse of `pack_bits`."""
    weights = _table("bits", codes.device)
    bits = (codes.unsqueeze(-1) & weights) != 0
    return bits.reshape(*codes.shape[:-1], -1)[..., :m]


def simhash(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Packed SimHash codes of vectors x (..., D) -> (..., ceil(m / 8)) uint8."""
    return pack_bits(sign_bits(x, projection))


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distance between packed codes, broadcasting over leading dims: (..., n_bytes) -> (...).

    Returns int32 distances in [0, 8 * n_bytes].
    """
    if a.shape[-1] == 2 and b.shape[-1] == 2 and a.stride(-1) == 1 and b.stride(-1) == 1:
        # 16-bit codes (proj_dim <= 16, the default) as one int16 each: one XOR and one lookup in a
        # 65536-entry table instead of a lookup per byte and a sum. A negative int16 indexes from the
        # end of the table, i.e. at its unsigned value.
        try:
            x = torch.bitwise_xor(a.view(torch.int16), b.view(torch.int16))[..., 0]
            return _table("popcount16", a.device)[x.int()]
        except RuntimeError:  # strides that do not allow the int16 view: the byte path below
            pass
    table = _table("popcount", a.device)
    return table[torch.bitwise_xor(a, b).int()].sum(-1, dtype=torch.int32)
