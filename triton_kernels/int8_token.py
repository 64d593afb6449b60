"""``int8_token``: symmetric int8 with one float32 scale per token.

For the inputs of linear layers, whose quantisation error only reaches the
weight gradient. Leading dimensions flatten into tokens; each token (a row over
the last dimension, the channels) gets ``scale = amax / 127`` and codes
``round(x / scale)`` in [-127, 127] (see ``_common`` for the exact arithmetic,
the all-zero floor, stochastic rounding and non-finite rows).

Payloads, for an input of shape ``(*lead, C)``:

* ``q``: int8, shape ``(*lead, C)``, contiguous;
* ``scale``: float32, shape ``(*lead, 1)``; NaN for a row holding a NaN or an
  infinity (that row decodes to NaN).

Compressed size: ``T * C + 4 * T`` bytes for ``T = prod(lead)`` tokens. Accepts
float32, bfloat16 and float16 inputs with at least one dimension and a
non-empty last dimension.

The compress kernel reads each row once when it fits one block (up to 8192
channels); wider rows are swept twice inside the same program, the second
sweep served mostly from cache.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import triton
import triton.language as tl

from adacc_compiler.triton_kernels import _common as cm

NAME = "int8_token"
QMAX = 127
MAX_BLOCK_C = 8192

__all__ = [*cm.CODEC_MODULE_API, "QMAX"]


def _scale_shape(shape: Sequence[int]) -> list[int]:
    return [*shape[:-1], 1]


def _check_payloads(q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> tuple[int, int]:
    cm.check_float_dtype(NAME, dtype, "output")
    tokens, channels = cm.tokens_channels(NAME, shape)
    cm.check_payload(NAME, "q", q, torch.int8, shape)
    cm.check_payload(NAME, "scale", scale, torch.float32, _scale_shape(shape))
    return tokens, channels


def compressed_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    cm.check_float_dtype(NAME, dtype)
    tokens, channels = cm.tokens_channels(NAME, shape)
    return tokens * channels + 4 * tokens


def supports(shape: Sequence[int], dtype: torch.dtype) -> bool:
    return cm.supports_float(shape, dtype)


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------


def reference_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    tokens, channels = cm.check_input(NAME, x, seed)
    rows = x.reshape(tokens, channels)
    noise = cm.cpu_noise((tokens, channels), seed, x.device) if stochastic else None
    codes, scale = cm.reference_quantize_groups(rows, QMAX, noise)
    return codes.to(torch.int8).reshape(x.shape), scale.reshape(_scale_shape(x.shape))


def reference_decompress(q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    _check_payloads(q, scale, shape, dtype)
    return (q.to(torch.float32) * scale).reshape(list(shape)).to(dtype)


# --------------------------------------------------------------------------------------
# Fast torch path (CPU, and any device without Triton)
# --------------------------------------------------------------------------------------


def compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    tokens, channels = cm.check_input(NAME, x, seed)
    rows = x.contiguous().view(tokens, channels)
    noise = cm.cpu_noise((tokens, channels), seed, x.device) if stochastic else None
    codes, scale = cm.fast_quantize_groups(rows, QMAX, noise)
    return codes.to(torch.int8).view(x.shape), scale.view(_scale_shape(x.shape))


def decompress(q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    tokens, channels = _check_payloads(q, scale, shape, dtype)
    out = torch.empty(list(shape), dtype=dtype, device=q.device)
    # One pass: the product is computed in float32 (type promotion) and rounded
    # once into the output dtype.
    torch.mul(q.view(tokens, channels), scale.view(tokens, 1), out=out.view(tokens, channels))
    return out


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _compress_kernel(
    x_ptr, q_ptr, scale_ptr, T, C, seed,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
    QMAX: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    base = rows.to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK_C)[None, :]
    if SINGLE:
        mask = row_ok[:, None] & (cols < C)
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        amax, nbad = cm.group_stats(x)
        inv, scale = cm.group_scales(amax, nbad > 0, QMAX)
        codes = cm.quantize_codes(x * inv[:, None], (nbad > 0)[:, None], seed, base + cols, QMAX, STOCHASTIC)
        tl.store(q_ptr + base + cols, codes.to(tl.int8), mask=mask)
    else:
        amax = tl.zeros([BLOCK_T], tl.float32)
        nbad = tl.zeros([BLOCK_T], tl.int32)
        for c0 in range(0, C, BLOCK_C):
            mask = row_ok[:, None] & (c0 + cols < C)
            x = tl.load(x_ptr + base + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            chunk_amax, chunk_bad = cm.group_stats(x)
            amax = tl.maximum(amax, chunk_amax)
            nbad = tl.maximum(nbad, chunk_bad)
        inv, scale = cm.group_scales(amax, nbad > 0, QMAX)
        for c0 in range(0, C, BLOCK_C):
            mask = row_ok[:, None] & (c0 + cols < C)
            x = tl.load(x_ptr + base + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            offs = base + c0 + cols
            codes = cm.quantize_codes(x * inv[:, None], (nbad > 0)[:, None], seed, offs, QMAX, STOCHASTIC)
            tl.store(q_ptr + offs, codes.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def _decompress_kernel(q_ptr, scale_ptr, out_ptr, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < T)[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < T, other=0.0)
    tl.store(out_ptr + offs, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def triton_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0, *, max_block_c: int = MAX_BLOCK_C):
    """The Triton compress kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    tokens, channels = cm.check_input(NAME, x, seed)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(_scale_shape(x.shape), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return q, scale
    def launch(c: dict) -> None:
        _compress_kernel[cm.grid_1d(tokens, c["BLOCK_T"])](
            x, q, scale, tokens, channels, seed,
            BLOCK_T=c["BLOCK_T"], BLOCK_C=c["BLOCK_C"], SINGLE=channels <= c["BLOCK_C"],
            QMAX=QMAX, STOCHASTIC=bool(stochastic), enable_fp_fusion=False, num_warps=c["num_warps"],
        )

    candidates = cm.tile_candidates(tokens, channels, max_block_c=max_block_c, per_thread=(64, 32, 16))
    key = (channels, x.dtype, bool(stochastic))
    cm.launch_tuned(f"{NAME}.compress", key, candidates, launch, numel=x.numel(), device=x.device)
    return q, scale


def triton_decompress(q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    """The Triton decompress kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    tokens, channels = _check_payloads(q, scale, shape, dtype)
    out = torch.empty(list(shape), dtype=dtype, device=q.device)
    if tokens == 0:
        return out
    q, scale = q.contiguous(), scale.contiguous()

    def launch(c: dict) -> None:
        _decompress_kernel[cm.tile_grid(tokens, channels, c)](
            q, scale, out, tokens, channels, BLOCK_T=c["BLOCK_T"], BLOCK_C=c["BLOCK_C"], num_warps=c["num_warps"]
        )

    candidates = cm.tile_candidates(tokens, channels, max_block_c=4096)
    cm.launch_tuned(f"{NAME}.decompress", (channels, dtype), candidates, launch, numel=out.numel(), device=out.device)
    return out


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def compress_fake(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    cm.check_input(NAME, x, seed)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(_scale_shape(x.shape), dtype=torch.float32)


def decompress_fake(q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    cm.check_float_dtype(NAME, dtype, "output")
    return q.new_empty(list(shape), dtype=dtype)


CODEC = cm.define_codec(sys.modules[__name__], ("q", "scale"), lossless=False, description="int8, one float32 scale per token (row over the last dim); for linear-layer inputs")
compress_op, decompress_op = CODEC.compress_op, CODEC.decompress_op
