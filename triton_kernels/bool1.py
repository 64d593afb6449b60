"""``bool1``: lossless 1-bit packing of ``torch.bool`` tensors (8 values a byte).

For masks (ReLU, dropout, comparisons), which PyTorch stores a byte per value.
Any shape, 0-d included: the tensor is flattened in row-major order and padded
with ``False`` to a multiple of 8.

Payload (one, so the op returns a one-element list; see the registry):

* ``packed``: uint8 ``(ceil(numel / 8),)``; bit ``i`` of byte ``j`` is element
  ``8 * j + i``.

Compressed size: ``ceil(numel / 8)`` bytes. ``stochastic`` and ``seed`` are
accepted for the common signature and ignored; decompress only produces
``torch.bool``.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
import triton
import triton.language as tl

from adacc_compiler.triton_kernels import _common as cm

NAME = "bool1"

__all__ = [*cm.CODEC_MODULE_API]


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype != torch.bool:
        raise ValueError(f"codec {NAME!r}: {what} dtype {dtype} is not supported; accepted dtypes: bool")


def _nbytes(shape: Sequence[int]) -> int:
    return (math.prod(shape) + 7) // 8


def _check_payloads(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> int:
    _check_dtype(dtype, "output")
    cm.check_payload(NAME, "packed", packed, torch.uint8, [_nbytes(shape)])
    return math.prod(shape)


def compressed_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    _check_dtype(dtype, "input")
    return _nbytes(shape)


def supports(shape: Sequence[int], dtype: torch.dtype) -> bool:
    return dtype == torch.bool and math.prod(shape) > 0


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------

_WEIGHTS = [1 << i for i in range(8)]


def reference_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    _check_dtype(x.dtype, "input")
    bits = x.reshape(-1).to(torch.int32)
    bits = torch.nn.functional.pad(bits, (0, 8 * _nbytes(x.shape) - bits.numel()))
    weights = torch.tensor(_WEIGHTS, dtype=torch.int32, device=x.device)
    return [(bits.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)]


def reference_decompress(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    numel = _check_payloads(packed, shape, dtype)
    weights = torch.tensor(_WEIGHTS, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[:, None] & weights) != 0
    return bits.reshape(-1)[:numel].reshape(list(shape))


# --------------------------------------------------------------------------------------
# Fast torch path (CPU, and any device without Triton)
# --------------------------------------------------------------------------------------

# Read 8 bytes (each 0 or 1) as one little-endian int64 v; in v * _GATHER the
# byte i of v lands on bit 56 + i and nothing else reaches bits 56..63 or
# carries into them, so the top byte is the packed byte. int64 products wrap.
_GATHER = 0x0102040810204080
# The way back, on one int64 per packed byte b: b * _REPEAT copies b into all 8
# bytes, & _SELECT keeps bit i in byte i, + 0x7F.. sets bit 7 of exactly the
# non-zero bytes (no carries between bytes), and >> 7 & _REPEAT leaves 0 or 1.
_REPEAT = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64
_SPREAD = 0x7F7F7F7F7F7F7F7F


def compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    _check_dtype(x.dtype, "input")
    numel = x.numel()
    nbytes = _nbytes(x.shape)
    flat = x.contiguous().view(torch.uint8).view(-1)
    if numel % 8 or flat.data_ptr() % 8:  # the int64 view needs whole, aligned words
        flat = torch.zeros(8 * nbytes, dtype=torch.uint8, device=x.device)
        flat[:numel].copy_(x.reshape(-1))
    words = flat.view(torch.int64)
    return [torch.mul(words, _GATHER).bitwise_right_shift_(56).to(torch.uint8)]


def decompress(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    numel = _check_payloads(packed, shape, dtype)
    words = packed.to(torch.int64).mul_(_REPEAT).bitwise_and_(_SELECT).add_(_SPREAD)
    bits = words.bitwise_right_shift_(7).bitwise_and_(_REPEAT).view(torch.bool)
    if bits.numel() == numel:
        return bits.view(list(shape))
    return bits[:numel].reshape(list(shape)).clone()


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _compress_kernel(x_ptr, packed_ptr, N, NB, BLOCK_B: tl.constexpr):
    byte_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bit = tl.arange(0, 8)[None, :]
    elem = byte_idx.to(tl.int64)[:, None] * 8 + bit
    v = tl.load(x_ptr + elem, mask=elem < N, other=0)
    byte = tl.sum((v != 0).to(tl.int32) << bit, axis=1)
    tl.store(packed_ptr + byte_idx, byte.to(tl.uint8), mask=byte_idx < NB)


@triton.jit
def _decompress_kernel(packed_ptr, out_ptr, N, NB, BLOCK_B: tl.constexpr):
    byte_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bit = tl.arange(0, 8)[None, :]
    elem = byte_idx.to(tl.int64)[:, None] * 8 + bit
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < NB, other=0).to(tl.int32)
    tl.store(out_ptr + elem, ((byte[:, None] >> bit) & 1).to(tl.uint8), mask=elem < N)


def _candidates(nbytes: int) -> list[dict]:
    """Launch configurations, the default first: (bytes per program, 8 bits) tiles."""
    return cm.tile_candidates(nbytes, 8, max_block_c=8)


def triton_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    """The Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check_dtype(x.dtype, "input")
    nbytes = _nbytes(x.shape)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    if nbytes:
        # bool storage is one byte per value, 0 or 1: read it as uint8
        flat = x.contiguous().view(torch.uint8)

        def launch(c: dict) -> None:
            _compress_kernel[cm.grid_1d(nbytes, c["BLOCK_T"])](
                flat, packed, x.numel(), nbytes, BLOCK_B=c["BLOCK_T"], num_warps=c["num_warps"]
            )

        cm.launch_tuned(f"{NAME}.compress", (), _candidates(nbytes), launch, numel=x.numel(), device=x.device)
    return [packed]


def triton_decompress(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    """The Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    numel = _check_payloads(packed, shape, dtype)
    out = torch.empty(list(shape), dtype=torch.bool, device=packed.device)
    if numel:
        nbytes, packed = packed.numel(), packed.contiguous()

        def launch(c: dict) -> None:
            _decompress_kernel[cm.grid_1d(nbytes, c["BLOCK_T"])](
                packed, out.view(torch.uint8), numel, nbytes, BLOCK_B=c["BLOCK_T"], num_warps=c["num_warps"]
            )

        cm.launch_tuned(f"{NAME}.decompress", (), _candidates(nbytes), launch, numel=numel, device=out.device)
    return out


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def compress_fake(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    _check_dtype(x.dtype, "input")
    return [x.new_empty((_nbytes(x.shape),), dtype=torch.uint8)]


def decompress_fake(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
    _check_dtype(dtype, "output")
    return packed.new_empty(list(shape), dtype=torch.bool)


CODEC = cm.define_codec(sys.modules[__name__], ("packed",), lossless=True, description="bool tensors packed 8 values a byte, bit-exact; for masks")
compress_op, decompress_op = CODEC.compress_op, CODEC.decompress_op
