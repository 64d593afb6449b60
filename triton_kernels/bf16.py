"""``bf16``: float32 values stored as bfloat16 (2x), rounded to nearest even.

For float32 activations that can take a small error anywhere: bfloat16 keeps
float32's exponent range, so nothing overflows or flushes that float32 holds
short of the largest finite values, and it keeps 8 significant bits, about
55 dB SQNR on any data, outliers or not (int8's 4x costs 40-45 dB on
LLM activations). The error of a plan that stores many values this way stays
small next to one that stores a few in int8 (see ``min_plan_sqnr_db``).

Payload (one, so the op returns a one-element list; see the registry):

* ``h``: bfloat16, the input's shape, contiguous. Rounding to nearest even is
  PyTorch's float32 -> bfloat16 conversion; stochastic rounding adds 16 random
  bits below bfloat16's last place before truncating (unbiased). inf keeps
  its sign; NaN stays NaN; float32 values beyond bfloat16's largest finite
  value round to infinity, as PyTorch's conversion does.

Compressed size: ``2 * numel`` bytes. Accepts float32 inputs only (any shape,
0-d included); a bfloat16 or float16 tensor gains nothing.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
import triton
import triton.language as tl

from adacc_compiler.triton_kernels import _common as cm

NAME = "bf16"
BLOCK = 1024

__all__ = [*cm.CODEC_MODULE_API]


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype != torch.float32:
        raise ValueError(f"codec {NAME!r}: {what} dtype {dtype} is not supported; accepted dtypes: float32")


def _check_input(x: torch.Tensor, seed: int) -> None:
    _check_dtype(x.dtype, "input")
    cm.check_seed(NAME, seed)


def _check_payloads(h: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> None:
    _check_dtype(dtype, "output")
    cm.check_payload(NAME, "h", h, torch.bfloat16, shape)


def compressed_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    _check_dtype(dtype, "input")
    return 2 * math.prod(shape)


def supports(shape: Sequence[int], dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and math.prod(shape) > 0


# --------------------------------------------------------------------------------------
# Reference (also the CPU path: one pass, which Inductor fuses into the producer)
# --------------------------------------------------------------------------------------


def _stochastic_bits(x: torch.Tensor, noise16: torch.Tensor) -> torch.Tensor:
    """bfloat16 of ``x`` with ``noise16`` (int32 in [0, 2**16)) added below its last place."""
    bits = x.contiguous().view(torch.int32)
    # Two's complement addition on the bit pattern grows the magnitude for
    # either sign; clearing the low half truncates toward zero.
    rounded = ((bits + noise16) & -65536).view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16)).contiguous()


def reference_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    _check_input(x, seed)
    if not stochastic:
        return [x.to(torch.bfloat16).contiguous()]
    noise = (cm.cpu_noise(x.shape, seed, x.device) * 65536.0).to(torch.int32)
    return [_stochastic_bits(x, noise)]


def reference_decompress(h: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    _check_payloads(h, shape, dtype)
    return h.to(torch.float32).contiguous()


compress = reference_compress
decompress = reference_decompress


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _compress_kernel(x_ptr, h_ptr, N, seed, BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    if STOCHASTIC:
        # int32 offsets: the noise stream repeats past 2**31 elements.
        up = bits + (tl.randint(seed, offs.to(tl.int32)) & 0xFFFF).to(tl.uint32)
    else:
        # Round to nearest, ties to the even bfloat16 (PyTorch's conversion).
        up = bits + (0x7FFF + ((bits >> 16) & 1)).to(tl.uint32)
    high = tl.where(finite, up, bits) >> 16
    high = tl.where(nan, 0x7FC0, high)
    tl.store(h_ptr + offs, high.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def _decompress_kernel(h_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    high = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.uint16, bitcast=True).to(tl.uint32)
    tl.store(out_ptr + offs, (high << 16).to(tl.float32, bitcast=True), mask=mask)


def triton_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    """The Triton compress kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check_input(x, seed)
    x = x.contiguous()
    h = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    n = x.numel()
    if n:
        _compress_kernel[cm.grid_1d(n, BLOCK)](x, h, n, seed, BLOCK=BLOCK, STOCHASTIC=bool(stochastic), num_warps=4)
    return [h]


def triton_decompress(h: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    """The Triton decompress kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check_payloads(h, shape, dtype)
    h = h.contiguous()
    out = torch.empty(list(shape), dtype=torch.float32, device=h.device)
    n = out.numel()
    if n:
        _decompress_kernel[cm.grid_1d(n, BLOCK)](h, out, n, BLOCK=BLOCK, num_warps=4)
    return out


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def compress_fake(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    _check_input(x, seed)
    return [x.new_empty(x.shape, dtype=torch.bfloat16)]


def decompress_fake(h: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    _check_dtype(dtype, "output")
    return h.new_empty(list(shape), dtype=torch.float32)


CODEC = cm.define_codec(
    sys.modules[__name__],
    ("h",),
    lossless=False,
    description="float32 stored as bfloat16 (2x, about 55 dB); for float32 values anywhere",
)
compress_op, decompress_op = CODEC.compress_op, CODEC.decompress_op
