"""Hamming distances of packed codes: the 16-bit fast path equals a bit-by-bit count."""

from __future__ import annotations

import pytest
import torch

from lshe.hashing import hamming, pack_bits


@pytest.mark.parametrize("bits", [16, 8, 24, 32])
def test_hamming_equals_bitwise_count_with_broadcasting(bits):
    generator = torch.Generator().manual_seed(bits)
    a = torch.rand(2, 3, 4, 1, bits, generator=generator) > 0.5
    b = torch.rand(2, 3, 1, 50, bits, generator=generator) > 0.5
    b[0, 0, 0, :3] = True  # all-ones codes: negative as int16
    distance = hamming(pack_bits(a), pack_bits(b))
    assert distance.dtype == torch.int32 and distance.shape == (2, 3, 4, 50)
    assert torch.equal(distance, (a != b).sum(-1).int())


def test_hamming_of_non_contiguous_codes_takes_the_byte_path():
    codes = torch.randint(0, 256, (5, 4), dtype=torch.uint8)
    a, b = codes[:, ::2], codes[:, 1::2]  # (5, 2) with stride 2 in the last dim
    bits_a = torch.stack([(a >> i) & 1 for i in range(8)], -1).reshape(5, -1)
    bits_b = torch.stack([(b >> i) & 1 for i in range(8)], -1).reshape(5, -1)
    assert torch.equal(hamming(a, b), (bits_a != bits_b).sum(-1).int())
