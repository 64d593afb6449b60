"""``int4_group``: symmetric int4 with one float32 scale per 32 channels, two codes a byte.

For the tightest memory budgets (about 3.2x smaller than bfloat16, 6.4x than
float32). Leading dimensions flatten into tokens; each token's channels are cut
into groups of 32 consecutive channels, each with ``scale = amax / 7`` and codes
``round(x / scale)`` in [-7, 7] (see ``_common`` for the exact arithmetic, the
all-zero floor, stochastic rounding and non-finite groups). A last dim that is
not a multiple of 32 ends in a partial group (padded with zeros inside).

Payloads, for an input of shape ``(*lead, C)``, ``G = ceil(C / 32)``:

* ``packed``: uint8 ``(*lead, ceil(C / 2))``; byte ``j`` of a token holds
  channel ``2j`` in its low nibble and channel ``2j + 1`` in its high nibble,
  each as a 4-bit two's complement code (an odd C leaves the last high nibble
  0; an all-zero payload decodes to zeros);
* ``scale``: float32 ``(*lead, G)``; NaN for a group holding a NaN or an
  infinity (the group decodes to NaN).

Compressed size: ``T * ceil(C / 2) + 4 * T * G`` bytes for ``T`` tokens.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import triton
import triton.language as tl

from adacc_compiler.triton_kernels import _common as cm

NAME = "int4_group"
QMAX = 7
GROUP = 32

__all__ = [*cm.CODEC_MODULE_API, "QMAX", "GROUP"]


def _payload_shapes(shape: Sequence[int]) -> tuple[list[int], list[int]]:
    lead, channels = list(shape[:-1]), shape[-1]
    return lead + [(channels + 1) // 2], lead + [cm.num_groups(channels, GROUP)]


def _check_payloads(packed, scale, shape, dtype) -> tuple[int, int]:
    cm.check_float_dtype(NAME, dtype, "output")
    tokens, channels = cm.tokens_channels(NAME, shape)
    packed_shape, scale_shape = _payload_shapes(shape)
    cm.check_payload(NAME, "packed", packed, torch.uint8, packed_shape)
    cm.check_payload(NAME, "scale", scale, torch.float32, scale_shape)
    return tokens, channels


def compressed_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    cm.check_float_dtype(NAME, dtype)
    tokens, channels = cm.tokens_channels(NAME, shape)
    return tokens * ((channels + 1) // 2) + 4 * tokens * cm.num_groups(channels, GROUP)


def supports(shape: Sequence[int], dtype: torch.dtype) -> bool:
    return cm.supports_float(shape, dtype)


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------


def reference_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    tokens, channels = cm.check_input(NAME, x, seed)
    rows = x.reshape(tokens, channels).to(torch.float32)
    groups = cm.num_groups(channels, GROUP)
    padded = torch.nn.functional.pad(rows, (0, groups * GROUP - channels)).reshape(-1, GROUP)
    noise = cm.padded_noise(tokens, channels, GROUP, seed, x.device) if stochastic else None
    codes, scale = cm.reference_quantize_groups(padded, QMAX, noise)
    nbytes = (channels + 1) // 2
    pairs = codes.reshape(tokens, groups * GROUP)[:, : 2 * nbytes].to(torch.int32).reshape(tokens, nbytes, 2)
    nibbles = pairs & 0xF  # two's complement in 4 bits
    packed = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8)
    packed_shape, scale_shape = _payload_shapes(x.shape)
    return packed.reshape(packed_shape), scale.reshape(scale_shape)


def reference_decompress(packed, scale, shape: Sequence[int], dtype: torch.dtype):
    tokens, channels = _check_payloads(packed, scale, shape, dtype)
    nbytes = (channels + 1) // 2
    b = packed.reshape(tokens, nbytes).to(torch.int32)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(tokens, 2 * nbytes)[:, :channels]
    codes = torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.float32)
    groups = cm.num_groups(channels, GROUP)
    per_channel = scale.reshape(tokens, groups).repeat_interleave(GROUP, dim=1)[:, :channels]
    return (codes * per_channel).reshape(list(shape)).to(dtype)


# --------------------------------------------------------------------------------------
# Fast torch path (CPU, and any device without Triton)
# --------------------------------------------------------------------------------------


def compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    tokens, channels = cm.check_input(NAME, x, seed)
    rows = x.contiguous().view(tokens, channels)
    groups = cm.padded_groups(rows, GROUP)
    noise = cm.padded_noise(tokens, channels, GROUP, seed, x.device) if stochastic else None
    codes, scale = cm.fast_quantize_groups(groups, QMAX, noise, inplace=True)
    nbytes = (channels + 1) // 2
    # Padded rows are whole groups, an even number of codes: each pair of int8
    # codes read as one little-endian int16 w holds the even channel in its low
    # byte and the odd one in its high byte, so (w & 0xF) | ((w >> 4) & 0xF0) is
    # the packed byte (two's complement nibbles), in one pass over the codes.
    width = cm.num_groups(channels, GROUP) * GROUP
    words = codes.to(torch.int8).view(torch.int16).view(tokens, width // 2)[:, :nbytes]
    packed = (words & 0xF).bitwise_or_((words >> 4).bitwise_and_(0xF0)).to(torch.uint8)
    packed_shape, scale_shape = _payload_shapes(x.shape)
    return packed.view(packed_shape), scale.view(scale_shape)


def decompress(packed, scale, shape: Sequence[int], dtype: torch.dtype):
    tokens, channels = _check_payloads(packed, scale, shape, dtype)
    nbytes = (channels + 1) // 2
    # Each byte widened to int16: arithmetic shifts sign-extend the low nibble
    # (<< 12 >> 12) and the high one (>> 4); putting them in the low and high
    # byte of one int16 lays the codes out in channel order (little-endian).
    wide = packed.reshape(tokens, nbytes).view(torch.int8).to(torch.int16)
    low = wide.bitwise_left_shift(12).bitwise_right_shift_(12).bitwise_and_(0xFF)
    pairs = wide.bitwise_right_shift_(4).bitwise_left_shift_(8).bitwise_or_(low)
    codes = pairs.view(torch.int8).view(tokens, 2 * nbytes)[:, :channels]
    out = torch.empty(list(shape), dtype=dtype, device=packed.device)
    groups = cm.num_groups(channels, GROUP)
    cm.dequantize_groups_into(out.view(tokens, channels), codes, scale.reshape(tokens, groups), GROUP)
    return out


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _compress_kernel(
    x_ptr, packed_ptr, scale_ptr, R, G, C, NB, seed,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    # One row of the block is one group (r = token * G + group), held as its
    # even and odd channels: pair j of the group becomes one byte.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (r < R)[:, None]
    token = (r // G).to(tl.int64)[:, None]
    pair = (r % G)[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
    even = 2 * pair
    offs_e = token * C + even
    x_e = tl.load(x_ptr + offs_e, mask=row_ok & (even < C), other=0.0).to(tl.float32)
    x_o = tl.load(x_ptr + offs_e + 1, mask=row_ok & (even + 1 < C), other=0.0).to(tl.float32)
    amax_e, bad_e = cm.group_stats(x_e)
    amax_o, bad_o = cm.group_stats(x_o)
    bad = tl.maximum(bad_e, bad_o) > 0
    inv, scale = cm.group_scales(tl.maximum(amax_e, amax_o), bad, QMAX)
    code_e = cm.quantize_codes(x_e * inv[:, None], bad[:, None], seed, offs_e, QMAX, STOCHASTIC)
    code_o = cm.quantize_codes(x_o * inv[:, None], bad[:, None], seed, offs_e + 1, QMAX, STOCHASTIC)
    byte = (code_e.to(tl.int32) & 0xF) | ((code_o.to(tl.int32) & 0xF) << 4)
    tl.store(packed_ptr + token * NB + pair, byte.to(tl.uint8), mask=row_ok & (pair < NB))
    tl.store(scale_ptr + r, scale, mask=r < R)


@triton.jit
def _decompress_kernel(
    packed_ptr, scale_ptr, out_ptr, T, C, G, NB,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < T)[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    byte = tl.load(packed_ptr + rows64 * NB + (cols // 2)[None, :], mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((cols % 2) * 4)[None, :]) & 0xF
    code = nibble - ((nibble & 8) << 1)  # sign-extend 4 bits
    scale = tl.load(scale_ptr + rows64 * G + (cols // GROUP)[None, :], mask=mask, other=0.0)
    y = code.to(tl.float32) * scale
    tl.store(out_ptr + rows64 * C + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def triton_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    """The Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    tokens, channels = cm.check_input(NAME, x, seed)
    x = x.contiguous()
    packed_shape, scale_shape = _payload_shapes(x.shape)
    packed = torch.empty(packed_shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return packed, scale
    groups = cm.num_groups(channels, GROUP)
    rows = tokens * groups
    nb = (channels + 1) // 2

    def launch(c: dict) -> None:
        _compress_kernel[cm.grid_1d(rows, c["BLOCK_T"])](
            x, packed, scale, rows, groups, channels, nb, seed,
            BLOCK_R=c["BLOCK_T"], GROUP=GROUP, QMAX=QMAX, STOCHASTIC=bool(stochastic), enable_fp_fusion=False,
            num_warps=c["num_warps"],
        )

    # One block row is one group: tiles of (groups, GROUP).
    candidates = cm.tile_candidates(rows, GROUP, max_block_c=GROUP)
    key = (channels, x.dtype, bool(stochastic))
    cm.launch_tuned(f"{NAME}.compress", key, candidates, launch, numel=x.numel(), device=x.device)
    return packed, scale


def triton_decompress(packed, scale, shape: Sequence[int], dtype: torch.dtype):
    """The Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    tokens, channels = _check_payloads(packed, scale, shape, dtype)
    out = torch.empty(list(shape), dtype=dtype, device=packed.device)
    if tokens == 0:
        return out
    packed, scale = packed.contiguous(), scale.contiguous()
    groups, nb = cm.num_groups(channels, GROUP), (channels + 1) // 2

    def launch(c: dict) -> None:
        _decompress_kernel[cm.tile_grid(tokens, channels, c)](
            packed, scale, out, tokens, channels, groups, nb,
            BLOCK_T=c["BLOCK_T"], BLOCK_C=c["BLOCK_C"], GROUP=GROUP, num_warps=c["num_warps"],
        )

    candidates = cm.tile_candidates(tokens, channels, max_block_c=4096)
    cm.launch_tuned(f"{NAME}.decompress", (channels, dtype), candidates, launch, numel=out.numel(), device=out.device)
    return out


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def compress_fake(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    cm.check_input(NAME, x, seed)
    packed_shape, scale_shape = _payload_shapes(x.shape)
    return x.new_empty(packed_shape, dtype=torch.uint8), x.new_empty(scale_shape, dtype=torch.float32)


def decompress_fake(packed, scale, shape: Sequence[int], dtype: torch.dtype):
    cm.check_float_dtype(NAME, dtype, "output")
    return packed.new_empty(list(shape), dtype=dtype)


CODEC = cm.define_codec(sys.modules[__name__], ("packed", "scale"), lossless=False, description="int4 (two codes a byte), float32 scale per 32 channels; for the tightest budgets")
compress_op, decompress_op = CODEC.compress_op, CODEC.decompress_op
