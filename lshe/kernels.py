"""Triton kernels on raw tensors (CUDA only): LSH-E's fused decode step, split-KV decode attention (which
can also do the decode step's writes, `SlotWrite`), and the key and value write on its own.

The LSH-E step is offered to the cache by `policies.lshe.LSHEPolicy.fused_step`; the torch path in
`lshe.layer` is the fallback and the reference.

Per layer and decode step the torch path runs about thirty small operations (hash the probe, hash the
new key, XOR, popcount lookup, sums, protection mask, argmin, four scatters). On a GPU each is a
kernel launch of a few microseconds doing almost no work, which is what makes eviction expensive at
batch 1. `lshe_step` does all of it in one launch, one program per (row, KV head):

1. SimHash the probe (the group's query heads, or the new key) and the new key with the layer's
   projection, in float32, packed to integers (bit ``j`` of the code is bit ``j % 8`` of byte
   ``j // 8``, as `lshe.hashing.pack_bits` stores it);
2. scan the slots' packed codes in blocks: Hamming distance (summed over the group's query heads),
   empty usable slots first, protected (sink, the ``recent`` last written) or unusable slots never;
   keep the running maximum, ties to the lowest slot;
3. write the new key's code into the victim slot, mark it valid, and push it onto the recent list.

The victims are the torch path's (`tests/test_kernels.py` checks it) with one caveat: a projection
within float32 rounding of zero can give its sign bit differently, since the dot products are summed
in another order. Keys and values are written afterwards as for every policy: by the attention
launch (`SlotWrite`) or by `write_kv`.
Greedy scores only (``score_decay == 0``) and codes of at most 32 bits; anything else, and every CPU
tensor, takes the torch path. Norm-aware LSH-E (``norms`` given) scores a slot by
``norm * sum_g cos(pi h_g / m)`` instead, from a cosine table shared with the torch path and summed in
the same order, so its victims are the torch path's too (same caveat on sign bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

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
    norms: torch.Tensor | None = None,
    cos_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on raw tensors; ``codes``, ``valid`` and ``recent_slots`` change in place.

    Args:
        query: (B, Hq, 1, D); key: (B, H, 1, D); projection: (D, m) float32, m <= 32.
        codes: (B, H, S, ceil(m / 8)) uint8, contiguous; valid: (B, H, S) bool, contiguous.
        usable: (B or 1, 1, S) bool; recent_slots: (B, H, R) int64, contiguous (S = no slot).
        sink: slots below this index are protected.
        probe_query: hash the query heads of each group (else the new key) as the probe.
        norms: (B, H, S) float16, contiguous, for norm-aware LSH-E (``LSHEPolicy(norm_aware=True)``):
            the victim is the slot with the lowest ``norm * sum_g cos_table[hamming_g]`` (summed in
            the group's order, as the torch path does), and the new key's norm is stored with its
            code; ``cos_table`` (m + 1,) float32 is `policies.lshe.cos_table`. None: plain LSH-E.
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
    norm_aware = norms is not None
    if norm_aware:
        if not norms.is_contiguous() or norms.dtype != torch.float16 or norms.shape != codes.shape[:3]:
            raise ValueError("norms must be a contiguous float16 (B, H, S) tensor")
        if cos_table is None or cos_table.shape != (bits + 1,) or cos_table.dtype != torch.float32:
            raise ValueError(f"cos_table must be a float32 ({bits + 1},) tensor")
        if slots >= 1 << 30:
            raise ValueError("the norm-aware kernel takes fewer than 2**30 slots")
        # (B, H, 1), as LSHEPolicy.token_features computes it
        new_norm = key_norms(key).half().contiguous()
    slot = torch.empty(batch, heads, 1, dtype=torch.int64, device=codes.device)
    usable = usable.view(torch.uint8)
    best, arrived = _workspace(codes.device, batch * heads)
    block_s = min(BLOCK_SLOTS, triton.next_power_of_2(slots))
    # Enough programs to fill the GPU (about 4 per multiprocessor), no more: each program hashes the
    # probe once and then scans `tiles` blocks, so many rows do not pay the hashing once per block.
    programs = STEP_PROGRAMS_PER_SM * multiprocessors(codes.device)
    blocks = triton.cdiv(slots, block_s)
    tiles = triton.cdiv(blocks, max(1, triton.cdiv(programs, batch * heads)))
    chunks = triton.cdiv(blocks, tiles)
    # Codes of 1, 2 or 4 bytes are read as one integer per slot; 3 bytes byte by byte.
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(n_bytes)
    code_words = codes.view(word) if word is not None else codes
    with on_device(codes.device):
        _lshe_step_kernel[(batch * heads, chunks)](
            query, query.stride(0), query.stride(1),
            key, key.stride(0), key.stride(1),
            projection,
            codes, code_words, valid.view(torch.uint8), usable, usable.stride(0) if usable.shape[0] > 1 else 0,
            recent_slots, slot, best, arrived,
            norms if norm_aware else valid, new_norm if norm_aware else valid,
            cos_table if norm_aware else valid,
            heads, slots, sink, chunks, tiles,
            D=dim, D_BLOCK=triton.next_power_of_2(dim),
            M=bits, M_BLOCK=max(2, triton.next_power_of_2(bits)), NB=n_bytes, WORD=word is not None,
            G=group, G_BLOCK=max(2, triton.next_power_of_2(group)),
            R=recent, R_BLOCK=max(2, triton.next_power_of_2(recent)),
            PROBE_QUERY=probe_query, BLOCK_S=block_s, POPC=os.environ.get("TRITON_INTERPRET") != "1",
            NORM=norm_aware, ONE_CHUNK=chunks == 1, num_warps=4,
        )  # fmt: skip
    return slot


def key_norms(keys: torch.Tensor) -> torch.Tensor:
    """The float32 L2 norm of each key (last dim): one launch for half-precision keys, where
    ``keys.float().norm(dim=-1)`` is an upcast copy and a norm (float64 keys are rounded to float32
    first, as ``.float()`` rounds them)."""
    if keys.dtype == torch.float64:
        keys = keys.float()
    return torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


STEP_PROGRAMS_PER_SM = 4  # programs of the fused LSH-E step per multiprocessor (see `lshe_step`)
ATTENTION_PROGRAMS_PER_SM = 4  # programs of the split-KV attention per multiprocessor, at most


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (a model split over GPUs
    has layers on several); CPU tensors (Triton's interpreter) need nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


BLOCK_SLOTS = 512  # slots one program scans: (rows x KV heads x chunks) programs fill the GPU at batch 1
_WORKSPACES: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, KV head): the packed best (priority, slot) so far and the count of chunks done.

    Zeroed once; the last program of each (row, KV head) resets its entries, so launches on one stream
    (the layers of a step, the steps of a graph) share them without a memset.
    """
    key = (torch.device(device), rows)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (
            torch.zeros(rows, dtype=torch.int64, device=device),
            torch.zeros(rows, dtype=torch.int32, device=device),
        )
    return _WORKSPACES[key]


def attention_applies(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether `decode_attention` handles these tensors (CUDA, one query token, power-of-two head dim)."""
    dim = keys.shape[-1]
    return (
        triton is not None
        and query.is_cuda
        and query.shape[2] == 1
        and dim >= 16
        and dim & (dim - 1) == 0
        and keys.is_contiguous()
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def kv_write_applies(
    keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> bool:
    """Whether `write_kv` handles these tensors (CUDA, one new token and one int64 slot per (row, KV
    head), contiguous storage, same dtypes); anything else takes the torch path, which raises where
    the shapes or dtypes do not fit."""
    return (
        triton is not None
        and keys.is_cuda
        and key.device == value.device == slot.device == values.device == keys.device
        and slot.dtype == torch.int64
        and slot.shape == (*keys.shape[:2], 1)
        and key.shape == value.shape == (*keys.shape[:2], 1, keys.shape[3])
        and keys.is_contiguous()
        and values.is_contiguous()
        and keys.shape == values.shape
        and key.dtype == keys.dtype
        and value.dtype == values.dtype
    )


def write_kv(
    keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> None:
    """``keys[b, h, slot[b, h]] = key[b, h, 0]`` and the same for the values, in one launch.

    What two ``scatter_`` calls do (`SlotWrite.before_attention`'s torch path), one program per
    (row, KV head); a plain copy, so bit for bit the same. At batch 1 the two scatters are two ~4 us
    kernels per layer and decode step (measurement log, note 18).

    Args:
        keys, values: (B, H, S, D) contiguous; slot: (B, H, 1) int64 slots in [0, S) (a slot outside
            fails a device assert, as ``scatter_`` does: a policy's `fused_step` may return any slot);
        key, value: (B, H, 1, D), any strides, the storage's dtype.
    """
    batch, heads, slots, dim = keys.shape
    with on_device(keys.device):
        _write_kv_kernel[(batch * heads,)](
            keys, values, slot, slot.stride(0), slot.stride(1), key, key.stride(0), key.stride(1), key.stride(3),
            value, value.stride(0), value.stride(1), value.stride(3), heads, slots,
            DIM=dim, BLOCK_D=triton.next_power_of_2(dim), num_warps=1,
        )  # fmt: skip


BLOCK_N = 64  # slots per inner tile of the attention kernel
# Up to this many slots, one program per (row, KV head) and no merge launch: at batch 1 a short cache
# is latency-bound, and one launch fewer is worth more than more programs (docs/measurement-log.md, 19).
ONE_SPLIT_SLOTS = 128
ATTENTION_WARPS, ATTENTION_STAGES = 4, 2  # of the split kernel


def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors, which the kernels' grids are sized by (2 for CPU tensors, which
    run in Triton's interpreter)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def attention_programs(device: torch.device) -> int:
    """Programs of the split attention kernel that fill the GPU: `ATTENTION_PROGRAMS_PER_SM` per
    multiprocessor (8 under Triton's CPU interpreter)."""
    return ATTENTION_PROGRAMS_PER_SM * multiprocessors(device)


def folds_in_one_wave(rows: int, splits: int, device: torch.device) -> bool:
    """Whether a `SlotWrite` is done by the attention launch itself at this grid (else by its own
    launches around it). The kernel that writes holds ~110 registers per thread against ~80, so only
    `ATTENTION_PROGRAMS_PER_SM` = 4 of its programs fit on a multiprocessor: a grid beyond one such
    wave (large batches) runs a second wave, ~20% slower at batch 27 x 9830 slots, where the writes'
    own launch costs 1.5% (docs/measurement-log.md, note 20). Small batches, which are latency-bound,
    are where folding pays."""
    return rows * splits <= attention_programs(device)


def split_slots(rows: int, slots: int, device: torch.device, one_split: bool = False) -> tuple[int, int]:
    """(splits, chunk) of the split-KV attention kernels: enough (rows x KV heads x splits) programs
    to fill the GPU (`ATTENTION_PROGRAMS_PER_SM`; 8 under Triton's CPU interpreter), chunks a multiple
    of `BLOCK_N` slots; one split with ``one_split``."""
    programs = attention_programs(device)
    splits = 1 if one_split else max(1, min(triton.cdiv(programs, rows), triton.cdiv(slots, BLOCK_N)))
    chunk = triton.cdiv(triton.cdiv(slots, splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(slots, chunk), chunk


@dataclasses.dataclass(frozen=True)
class SlotWrite:
    """A decode step's writes, done by `decode_attention`'s launch instead of launches of their own.

    ``keys[b, h, slot[b, h]] = key[b, h, 0]`` and the same for the values (what `write_kv` does).
    Attention leaves the slot's stored token out of its loop over the tiles and adds the new token
    after it, from the step's key and value, so it sees the written cache whichever program stores
    it first. Optionally also: ``mark_valid[b, h, slot[b, h]] = True``; ``next_position[b] += 1``; and,
    with ``advance_slot``, ``slot += 1`` once every program has read it (a non-evicting layer's next
    free slot, kept in place for CUDA graphs).

    The cache after the step is bit for bit the separate writes'; the attention output equals theirs
    up to float rounding (the new token's logit is a sum in another order than a tile's product, and
    in bf16 its probability is rounded at another running maximum): `tests/test_folded_writes.py`.

    Unlike `write_kv` the slot is not range-checked (the attention kernel is not compiled in Triton's
    debug mode): only slots in [0, S) by construction may come here (see
    `lshe.layer.EvictingLayer.folds`). Where the attention's grid
    exceeds one wave of the writing kernel (`folds_in_one_wave`), the writes run as launches of
    their own around the attention instead, with the same cache.

    Fields: slot (B, H, 1) int64 (with ``advance_slot`` contiguous, else any strides, e.g. one slot per
    row expanded over the heads); key, value (B, H, 1, D), contiguous in D, the storage's dtype;
    mark_valid (B, H, S) bool contiguous or None; next_position (B,) int64 contiguous or None.
    """

    slot: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mark_valid: torch.Tensor | None = None
    next_position: torch.Tensor | None = None
    advance_slot: bool = False

    def before_attention(self, keys: torch.Tensor, values: torch.Tensor, fused: bool = True) -> None:
        """The writes as launches of their own, before an attention that does not do them: `write_kv`
        where it applies (and ``fused``), else two ``scatter_`` calls (the torch path, which raises where
        shapes or dtypes do not fit)."""
        if fused and kv_write_applies(keys, values, self.slot, self.key, self.value):
            write_kv(keys, values, self.slot, self.key, self.value)  # one launch instead of two
        else:
            index = self.slot[..., None].expand(-1, -1, -1, self.key.shape[-1])
            keys.scatter_(2, index, self.key)
            values.scatter_(2, index, self.value)
        if self.mark_valid is not None:
            self.mark_valid.scatter_(2, self.slot, True)

    def after_attention(self) -> None:
        """The advances, after that attention (in place, for CUDA graphs)."""
        if self.next_position is not None:
            self.next_position.add_(1)
        if self.advance_slot:
            self.slot.add_(1)

    def fits(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether the kernel can do these writes into ``keys`` and ``values`` (B, H, S, D)."""
        batch, heads, slots, dim = keys.shape
        slot, key, value = self.slot, self.key, self.value
        same_device = all(t.device == keys.device for t in (slot, key, value, values))
        return (
            same_device
            and keys.shape == values.shape
            and slot.dtype == torch.int64
            and slot.shape == (batch, heads, 1)
            and (not self.advance_slot or slot.is_contiguous())
            and key.shape == value.shape == (batch, heads, 1, dim)
            and key.stride(3) == value.stride(3) == 1
            and key.dtype == keys.dtype
            and value.dtype == values.dtype
            and (self.mark_valid is None or (self.mark_valid.shape == keys.shape[:3] and self.mark_valid.is_contiguous()))
            and (
                self.next_position is None
                or (self.next_position.shape == (batch,) and self.next_position.dtype == torch.int64
                    and self.next_position.is_contiguous())
            )
        )  # fmt: skip


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    write: SlotWrite | None = None,
) -> torch.Tensor:
    """Attention of one query token over cached slots, split over the slots (flash-decoding).

    Args:
        query: (B, Hq, 1, D); keys, values: (B, H, S, D) contiguous; valid: (B, H, S) bool, or None
            when every slot is valid. The Hq / H query heads of a group share one KV head.
        softcap: logit soft-capping (Gemma2's ``attn_logit_softcapping``): each scaled logit ``x``
            becomes ``softcap * tanh(x / softcap)`` before the softmax. None (the default) compiles
            the kernel without it. The tanh is computed from one exp in float32 (no libdevice, so
            that Triton's interpreter runs it too): about 1e-7 * softcap absolute error per logit.
        sinks: (Hq,) attention sinks (gpt-oss's ``s_aux``): one more logit per query head in the
            softmax, with no value; the merge adds ``exp(sink)`` to the denominator. None (the
            default) compiles the kernel without it.
        write: the decode step's writes (see `SlotWrite`), done by this launch where its grid fits
            one wave (`folds_in_one_wave`), else by launches of their own around it; attention sees
            the new token in its slot either way.
    Returns:
        (B, Hq, 1, D) in the query's dtype.

    SDPA's kernels parallelise over (batch, heads) only, which leaves most of the GPU idle at small
    batches; here (rows x KV heads x splits) programs each reduce a chunk of slots with an online
    softmax, and a second kernel merges the chunks by their log-sum-exp. Up to `ONE_SPLIT_SLOTS`
    slots (and without sinks) one program per (row, KV head) reduces them all and writes the output
    itself, bit for bit what the merge of one split writes, one launch fewer.
    """
    batch, q_heads, _, dim = query.shape
    heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // heads
    g_block = max(16, triton.next_power_of_2(group))
    rows = batch * heads
    splits, chunk = split_slots(
        rows, slots, query.device, one_split=slots <= ONE_SPLIT_SLOTS and sinks is None
    )
    direct = splits == 1 and sinks is None  # the split kernel writes the output: no merge launch
    partial = torch.empty(rows, splits, g_block, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(rows, splits, g_block, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, q_heads, 1, dim, dtype=query.dtype, device=query.device)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a number > 0 or None, got {softcap!r}")
    if sinks is not None:
        if sinks.shape != (q_heads,):
            raise ValueError(f"sinks must have shape ({q_heads},), got {tuple(sinks.shape)}")
        sinks = sinks.to(device=query.device, dtype=torch.float32).contiguous()
    masked = valid is not None
    valid_bytes = valid.view(torch.uint8) if masked else keys  # any pointer when unmasked
    args, flags, apart = write_arguments(write, keys, values, rows, splits, out)
    with on_device(query.device):
        _attention_split_kernel[(rows, splits)](
            query, query.stride(0), query.stride(1), keys, values, valid_bytes, partial, lse, lse, out,
            heads, slots, chunk, splits, scale, 1.0 if softcap is None else float(softcap), *args,
            D=dim, G=group, G_BLOCK=g_block, BLOCK_N=BLOCK_N, MASKED=masked,
            IEEE=query.dtype == torch.float32, SOFTCAP=softcap is not None, LOGITS=False, DIRECT=direct,
            **{**flags, "ADVANCE_SLOT": direct and flags["ADVANCE_SLOT"]},
            num_warps=ATTENTION_WARPS, num_stages=ATTENTION_STAGES,
        )  # fmt: skip
        if not direct:
            _attention_merge_kernel[(rows, group)](
                partial, lse, out, sinks if sinks is not None else lse, args[0], heads, splits, D=dim, G=group,
                G_BLOCK=g_block, SPLITS_BLOCK=max(2, triton.next_power_of_2(splits)), SINKS=sinks is not None,
                ADVANCE_SLOT=flags["ADVANCE_SLOT"], num_warps=4,
            )  # fmt: skip
    if apart is not None:
        apart.after_attention()
    return out


def write_arguments(
    write: SlotWrite | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: int,
    splits: int,
    anything: torch.Tensor,
) -> tuple[tuple, dict[str, bool], SlotWrite | None]:
    """The split attention kernel's write arguments (pointers and strides) and flags for ``write``, and
    the write that runs apart instead: where the grid exceeds one wave of the writing kernel
    (`folds_in_one_wave`) its writes are done here, as launches of their own, and its advances are
    the caller's to do after the attention (`SlotWrite.after_attention`). ``anything`` stands for the
    pointers of writes not asked for. Raises, before any write, where ``write`` does not fit."""
    if write is not None and not write.fits(keys, values):
        raise ValueError("SlotWrite does not fit the storage (see SlotWrite's fields)")
    apart = write if write is not None and not folds_in_one_wave(rows, splits, keys.device) else None
    if apart is not None:
        apart.before_attention(keys, values)
        write = None
    w = write if write is not None else SlotWrite(anything, anything, anything)
    args = (
        w.slot, w.slot.stride(0), w.slot.stride(1), w.key, w.key.stride(0), w.key.stride(1),
        w.value, w.value.stride(0), w.value.stride(1),
        w.mark_valid.view(torch.uint8) if w.mark_valid is not None else anything,
        w.next_position if w.next_position is not None else anything,
    )  # fmt: skip
    flags = {
        "WRITE": write is not None,
        "MARK_VALID": w.mark_valid is not None,
        "ADVANCE_POSITION": w.next_position is not None,
        "ADVANCE_SLOT": w.advance_slot,
    }
    return args, flags, apart


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
    def _popcount(x, POPC: tl.constexpr):
        """Set bits of each int32: the GPU's popc instruction, or SWAR where there is no PTX (Triton's
        CPU interpreter)."""
        if POPC:
            return tl.inline_asm_elementwise(
                "popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
            )
        return _popcount32(x)

    # debug=True keeps the device assert below: a slot out of range fails loudly, as scatter_ does
    @triton.jit(debug=True)
    def _write_kv_kernel(
        keys, values, slot, s_sb, s_sh, key, k_sb, k_sh, k_sd, value, v_sb, v_sh, v_sd, HEADS, SLOTS,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (row, KV head): copy the new key and value into the row's chosen slot."""
        pid = tl.program_id(0)
        b = pid // HEADS
        h = pid % HEADS
        target = tl.load(slot + b * s_sb + h * s_sh)
        tl.device_assert((target >= 0) & (target < SLOTS), "write_kv: a slot outside [0, slots)")
        d = tl.arange(0, BLOCK_D)
        inside = d < DIM
        k = tl.load(key + b * k_sb + h * k_sh + d * k_sd, mask=inside)
        v = tl.load(value + b * v_sb + h * v_sh + d * v_sd, mask=inside)
        offset = (pid.to(tl.int64) * SLOTS + target) * DIM + d
        tl.store(keys + offset, k, mask=inside)
        tl.store(values + offset, v, mask=inside)

    @triton.jit
    def _lshe_step_kernel(
        q_ptr, q_sb, q_sh,
        k_ptr, k_sb, k_sh,
        proj_ptr,
        codes_ptr, words_ptr, valid_ptr, usable_ptr, usable_sb,
        recent_ptr, slot_ptr, best_ptr, arrived_ptr,
        norms_ptr, new_norm_ptr, cos_ptr,
        H, S, sink, chunks, tiles,
        D: tl.constexpr, D_BLOCK: tl.constexpr,
        M: tl.constexpr, M_BLOCK: tl.constexpr, NB: tl.constexpr, WORD: tl.constexpr,
        G: tl.constexpr, G_BLOCK: tl.constexpr,
        R: tl.constexpr, R_BLOCK: tl.constexpr,
        PROBE_QUERY: tl.constexpr, BLOCK_S: tl.constexpr, POPC: tl.constexpr, NORM: tl.constexpr,
        ONE_CHUNK: tl.constexpr,
    ):  # fmt: skip
        """Program (row x KV head, chunk): the best victim of its chunk's slots, merged by an atomic max;
        the last chunk to finish writes the new token's code, validity and recent entry (with one chunk
        per row, ONE_CHUNK, the program writes them itself: no atomics, whose three dependent round
        trips to memory made a short cache's kernel 5.0 us instead of 3.1 at 77 slots on the H200).

        Priorities (higher = evicted first): plain LSH-E packs (priority + 2, an int32: the summed
        Hamming distance, 2**30 for an empty slot, -1 protected, -2 outside) above 31 bits of slot.
        NORM packs an int64 priority (0 outside, 1 protected, 2 + the order-preserving integer of the
        float32 ``-norm * sum_g cos[h_g]``, 2**32 + 2 for an empty slot) above 30 bits of slot."""
        pid = tl.program_id(0)
        chunk = tl.program_id(1)
        b = pid // H
        h = pid % H
        row = pid.to(tl.int64)  # (b * H + h): index of this (row, KV head)
        d = tl.arange(0, D_BLOCK)
        m = tl.arange(0, M_BLOCK)
        proj = tl.load(
            proj_ptr + d[:, None] * M + m[None, :], mask=(d[:, None] < D) & (m[None, :] < M), other=0.0
        )
        bit_value = tl.where(m < M, 1 << m, 0)  # int32; bit 31 wraps to the sign bit, as intended

        # SimHash of the new key (stored by the last program) and of the probe.
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

        # Running best per lane (lane i sees slots i, i + BLOCK_S, ...): the loop is elementwise, and
        # the two cross-lane reductions happen once per program instead of once per tile.
        if NORM:
            lane_priority = tl.full([BLOCK_S], -1, tl.int64)  # below every slot's priority (0 = outside)
        else:
            lane_priority = tl.full([BLOCK_S], -2, tl.int32)  # no slot outside is ever taken
        lane_slot = tl.zeros([BLOCK_S], dtype=tl.int32)
        for tile in tl.range(0, tiles):
            s = (chunk * tiles + tile) * BLOCK_S + tl.arange(0, BLOCK_S)
            inside = s < S
            if WORD:  # one 1/2/4-byte integer per slot, its sign extension masked off
                code = tl.load(words_ptr + row * S + s, mask=inside, other=0).to(tl.int32)
                if NB < 4:
                    code = code & ((1 << (8 * NB)) - 1)
            else:
                code = tl.zeros([BLOCK_S], dtype=tl.int32)
                for j in tl.static_range(NB):
                    byte = tl.load(codes_ptr + (row * S + s) * NB + j, mask=inside, other=0)
                    code = code | (byte.to(tl.int32) << (8 * j))
            valid = tl.load(valid_ptr + row * S + s, mask=inside, other=0) != 0
            usable = tl.load(usable_ptr + b * usable_sb + s, mask=inside, other=0) != 0
            protected = s < sink
            for i in tl.static_range(R):  # R scalar loads, issued together; no (BLOCK_S x R) matrix
                protected = protected | (s == tl.load(recent_ptr + row * R + i))
            if NORM:
                # sum_g cos(pi h_g / m) left to right (the torch path's order), times the key's norm
                total = tl.zeros([BLOCK_S], dtype=tl.float32)
                if PROBE_QUERY:
                    for gi in tl.static_range(G):
                        q_g = tl.sum(tl.where(g == gi, q_code, 0), axis=0)
                        total += tl.load(cos_ptr + _popcount(q_g ^ code, POPC))
                else:
                    total += tl.load(cos_ptr + _popcount(k_code ^ code, POPC))
                norm = tl.load(norms_ptr + row * S + s, mask=inside, other=0.0).to(tl.float32)
                negated = 0.0 - norm * total  # 0.0 - x: no negative zero
                bits = negated.to(tl.int32, bitcast=True)
                order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # float order as int
                priority = tl.where(valid, order + 2147483650, 4294967298)  # empty slots first
                priority = tl.where((valid & protected) | (usable == 0), 1, priority)
                priority = tl.where(inside, priority, 0)
            else:
                if PROBE_QUERY:
                    distance = tl.sum(
                        tl.where(g[:, None] < G, _popcount(q_code[:, None] ^ code[None, :], POPC), 0), axis=0
                    )
                else:
                    distance = _popcount(k_code ^ code, POPC)
                priority = tl.where(valid, distance, 1 << 30)  # empty slots first
                priority = tl.where((valid & protected) | (usable == 0), -1, priority)
                priority = tl.where(inside, priority, -2)
            take = priority > lane_priority  # strictly: a lane keeps its earlier (lower) slot on ties
            lane_slot = tl.where(take, s, lane_slot)
            lane_priority = tl.where(take, priority, lane_priority)
        best_priority = tl.max(lane_priority, axis=0)
        best_slot = tl.min(tl.where(lane_priority == best_priority, lane_slot, 0x7FFFFFFF), axis=0)  # lowest
        # Pack (priority, lowest slot first) into one int64 so that an integer max merges chunks.
        if NORM:
            packed = (best_priority.to(tl.int64) << 30) | (0x3FFFFFFF - best_slot).to(tl.int64)
        else:
            packed = ((best_priority + 2).to(tl.int64) << 32) | (0x7FFFFFFF - best_slot).to(tl.int64)
        if ONE_CHUNK:  # this program saw every slot: its best is the victim, no atomics to merge
            _store_victim(
                best_slot.to(tl.int64), row, S, k_code, recent, r,
                codes_ptr, valid_ptr, recent_ptr, slot_ptr, norms_ptr, new_norm_ptr, NB, R, NORM,
            )  # fmt: skip
        else:
            tl.atomic_max(best_ptr + row, packed)
            if tl.atomic_add(arrived_ptr + row, 1) == chunks - 1:  # the last chunk of this (row, KV head)
                final = tl.atomic_xchg(best_ptr + row, 0)
                tl.store(arrived_ptr + row, 0)
                if NORM:
                    victim = (0x3FFFFFFF - (final & 0x3FFFFFFF)).to(tl.int64)
                else:
                    victim = (0x7FFFFFFF - (final & 0x7FFFFFFF)).to(tl.int64)
                _store_victim(
                    victim, row, S, k_code, recent, r,
                    codes_ptr, valid_ptr, recent_ptr, slot_ptr, norms_ptr, new_norm_ptr, NB, R, NORM,
                )  # fmt: skip

    @triton.jit
    def _store_victim(
        victim, row, S, k_code, recent, r,
        codes_ptr, valid_ptr, recent_ptr, slot_ptr, norms_ptr, new_norm_ptr,
        NB: tl.constexpr, R: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        """The new token takes slot ``victim`` of (row, KV head) ``row``: its code (and norm), its
        validity bit, the recent list's newest entry, and the returned slot."""
        if NORM:
            tl.store(norms_ptr + row * S + victim, tl.load(new_norm_ptr + row))
        tl.store(slot_ptr + row, victim)
        for j in tl.static_range(NB):
            tl.store(codes_ptr + (row * S + victim) * NB + j, ((k_code >> (8 * j)) & 0xFF).to(tl.uint8))
        tl.store(valid_ptr + row * S + victim, tl.full([], 1, tl.uint8))
        if R > 0:
            # recent <- recent[1:] + [victim], shifted in registers (loaded before the scan).
            shifted = tl.sum(tl.where(r[None, :] == r[:, None] + 1, recent[None, :], 0), axis=1)
            shifted = tl.where(r == R - 1, victim, shifted)
            tl.store(recent_ptr + row * R + r, shifted, mask=r < R)

    @triton.jit
    def _attention_split_kernel(
        q_ptr, q_sb, q_sh, k_ptr, v_ptr, valid_ptr, partial_ptr, lse_ptr, logits_ptr, out_ptr,
        H, S, chunk, splits, scale, softcap,
        slot_ptr, slot_sb, slot_sh, nk_ptr, nk_sb, nk_sh, nv_ptr, nv_sb, nv_sh, mark_ptr, pos_ptr,
        D: tl.constexpr, G: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, LOGITS: tl.constexpr,
        DIRECT: tl.constexpr, WRITE: tl.constexpr, MARK_VALID: tl.constexpr,
        ADVANCE_POSITION: tl.constexpr, ADVANCE_SLOT: tl.constexpr,
    ):  # fmt: skip
        """Program (row x KV head, split): softmax-weighted sum of one chunk of slots, and its lse.
        With SOFTCAP the scaled logits x become softcap * tanh(x / softcap). With LOGITS every logit is
        also stored, (row x KV head, G, S) float32, -inf on invalid slots (`lshe.attention_stats` turns
        them into probabilities without reading the keys again). With DIRECT (one split, no sinks) the
        output goes to ``out_ptr`` (B, Hq, 1, D) in its dtype, as `_attention_merge_kernel` would
        store it: the merge of one split weighs it by exp(0) = 1 and divides by 1.
        With WRITE the step's `SlotWrite`: every program leaves slot ``s`` out of its loop (whether or
        not the store below has landed), the program whose chunk holds ``s`` adds the new token from
        registers after it, and split 0 stores the new key and value (and the valid byte, and
        advances the row's position from KV head 0); ADVANCE_SLOT (DIRECT only: the merge kernel
        does it otherwise) adds 1 to ``s`` once the whole program has read it."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // H
        h = pid % H
        row = pid.to(tl.int64)
        g = tl.arange(0, G_BLOCK)
        d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b * q_sb + (h * G + g)[:, None] * q_sh + d[None, :], mask=g[:, None] < G, other=0.0
        )
        m_i = tl.full([G_BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([G_BLOCK], dtype=tl.float32)
        acc = tl.zeros([G_BLOCK, D], dtype=tl.float32)
        start = split * chunk
        end = tl.minimum(start + chunk, S)
        if WRITE:
            s = tl.load(slot_ptr + b * slot_sb + h * slot_sh)
            new_k = tl.load(nk_ptr + b * nk_sb + h * nk_sh + d)
            new_v = tl.load(nv_ptr + b * nv_sb + h * nv_sh + d)
        for n0 in tl.range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            inside = n < end
            offsets = (row * S + n)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + offsets, mask=inside[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            if SOFTCAP:  # tanh(|y|) = (1 - e) / (1 + e) with e = exp(-2|y|) in (0, 1]: no overflow
                y = scores / softcap
                e = tl.exp(-2.0 * tl.abs(y))
                t = (1.0 - e) / (1.0 + e)
                scores = softcap * tl.where(y < 0, -t, t)
            ok = inside
            if MASKED:
                ok = ok & (tl.load(valid_ptr + row * S + n, mask=inside, other=0) != 0)
            if WRITE:  # the slot's old token is gone; the new one joins after the loop
                ok = ok & (n != s)
            scores = tl.where(ok[None, :], scores, float("-inf"))
            if LOGITS:
                at = logits_ptr + (row * G + g)[:, None] * S + n[None, :]
                keep = inside if not WRITE else inside & (n != s)  # the slot's logit is stored below
                tl.store(at, scores, mask=(g < G)[:, None] & keep[None, :])
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing valid yet
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + offsets, mask=inside[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if WRITE:
            # The new token, in the split whose chunk holds its slot: one more online-softmax step
            # (elsewhere its logit is -inf, which leaves m, l and acc as they are, bit for bit). The
            # probability is rounded to the values' dtype as the loop's tl.dot takes it.
            s_g = s + tl.zeros([G_BLOCK], dtype=tl.int64)  # one per query head, for the masks below
            ours = (s_g >= start) & (s_g < end)
            x = tl.sum(q.to(tl.float32) * new_k.to(tl.float32)[None, :], axis=1) * scale
            if SOFTCAP:
                y = x / softcap
                e = tl.exp(-2.0 * tl.abs(y))
                t = (1.0 - e) / (1.0 + e)
                x = softcap * tl.where(y < 0, -t, t)
            x = tl.where(ours, x, float("-inf"))
            if LOGITS:
                tl.store(logits_ptr + (row * G + g) * S + s, x, mask=(g < G) & ours)
            m_new = tl.maximum(m_i, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(x - m_safe)
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + p
            if not IEEE:
                p = p.to(new_v.dtype).to(tl.float32)
            acc = acc * alpha[:, None] + p[:, None] * new_v.to(tl.float32)[None, :]
            m_i = m_new
            if split == 0:
                tl.store(k_ptr + (row * S + s) * D + d, new_k)
                tl.store(v_ptr + (row * S + s) * D + d, new_v)
                if MARK_VALID:
                    tl.store(mark_ptr + row * S + s, tl.full([], 1, tl.uint8))
                if ADVANCE_POSITION:
                    if h == 0:
                        tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)
            if ADVANCE_SLOT:
                tl.debug_barrier()  # every thread has read s
                tl.store(slot_ptr + b * slot_sb + h * slot_sh, s + 1)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        real = g < G  # padding query heads (tl.dot needs 16 rows) are not written
        if DIRECT:
            at = out_ptr + (row * G + g)[:, None] * D + d[None, :]
            tl.store(at, out.to(out_ptr.dtype.element_ty), mask=real[:, None])
            return
        base = row * splits + split
        tl.store(partial_ptr + (base * G_BLOCK + g)[:, None] * D + d[None, :], out, mask=real[:, None])
        lse_value = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + base * G_BLOCK + g, lse_value, mask=real)

    @triton.jit
    def _attention_merge_kernel(
        partial_ptr, lse_ptr, out_ptr, sinks_ptr, slot_ptr, H, splits,
        D: tl.constexpr, G: tl.constexpr, G_BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
        SINKS: tl.constexpr, ADVANCE_SLOT: tl.constexpr,
    ):  # fmt: skip
        """Program (row x KV head, query head of the group): merge every split's partial output at
        once (no loop: a serial loop over the splits was latency-bound), weighted by exp(lse - max).
        With SINKS the query head's sink logit joins the max and adds exp(sink - max) to the total.
        With ADVANCE_SLOT (a `SlotWrite`'s; its slot is (B, H, 1) contiguous) the program of the
        group's first query head adds 1 to the row's slot, which every split has read by now."""
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        if ADVANCE_SLOT:
            if g == 0:
                tl.store(slot_ptr + row, tl.load(slot_ptr + row) + 1)
        sp = tl.arange(0, SPLITS_BLOCK)
        d = tl.arange(0, D)
        inside = sp < splits
        lse = tl.load(lse_ptr + (row * splits + sp) * G_BLOCK + g, mask=inside, other=float("-inf"))
        top = tl.max(lse, axis=0)
        if SINKS:  # this program's query head is (row % H) * G + g; sinks are (Hq,) float32
            sink = tl.load(sinks_ptr + (row % H) * G + g)
            top = tl.maximum(top, sink)
        weight = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
        parts = tl.load(
            partial_ptr + ((row * splits + sp) * G_BLOCK + g)[:, None] * D + d[None, :],
            mask=inside[:, None],
            other=0.0,
        )
        total = tl.sum(weight, axis=0)
        if SINKS:
            total += tl.exp(sink - top)
        out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total == 0.0, 1.0, total)
        # out is (B, Hq, 1, D) contiguous: query head h * G + g of row b sits at (row * G + g) * D.
        tl.store(out_ptr + (row * G + g) * D + d, out.to(out_ptr.dtype.element_ty))
