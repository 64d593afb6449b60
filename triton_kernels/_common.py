"""Pieces the codecs share: argument checks, the group quantiser, Triton helpers, op registration.

Every lossy codec here is the same arithmetic applied to different groupings of
the last dimension (a whole row for ``int8_token``, 32 channels for the group
codecs). The quantiser is defined once, as a plain reference and as a fast CPU
path, and the Triton kernels call the ``@triton.jit`` helpers below, so that the
three implementations follow one definition:

* ``amax``: the largest ``|x|`` over the finite values of a group, floored at
  ``AMAX_FLOOR`` so that an all-zero (or denormal) group never divides by zero
  and its reciprocal stays finite;
* ``inv = qmax / amax`` and ``scale = amax / qmax``, both correctly rounded
  float32 divisions (``tl.math.div_rn`` in the kernels; never
  ``Tensor.__rtruediv__`` or a Python-number divisor, which CUDA
  multiplies by a reciprocal);
* codes: ``round_half_even(x * inv)`` or, stochastically,
  ``floor(x * inv + u)`` with ``u ~ U[0, 1)``, clamped to ``[-qmax, qmax]``;
* a group holding any NaN or infinity gets codes 0 and scale NaN, so the whole
  group decodes to NaN: a non-finite value never decodes to a finite one;
* decoding is ``codes * scale`` in float32, rounded once to the output dtype.

Stochastic noise: on CPU ``torch.rand`` over the tensor's elements in row-major
order from a ``torch.Generator`` seeded with ``seed``; on GPU ``tl.rand(seed,
element_index)``. Both are deterministic for a given seed, but they are
different streams.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from adacc_compiler.triton_kernels.registry import Codec, register_codec

__all__ = [
    "AMAX_FLOOR",
    "FLOAT_DTYPES",
    "check_float_dtype",
    "check_seed",
    "tokens_channels",
    "cpu_noise",
    "reference_quantize_groups",
    "fast_quantize_groups",
    "check_input",
    "supports_float",
    "same_values",
    "CODEC_MODULE_API",
    "define_codec",
    "grid_1d",
    "tile_candidates",
    "tile_grid",
    "launch_tuned",
    "tuned_configs",
]

log = logging.getLogger(__name__)

# The CPU paths pack and unpack bytes through wider integer views.
assert sys.byteorder == "little", "the codecs' CPU paths assume a little-endian host"

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_NAMES = "float32, bfloat16, float16"

# Groups whose largest magnitude is below this are quantised as if it were this:
# 127 / 2**-100 is far from float32 overflow, and such values are zero for any
# gradient purpose. A power of two keeps the floor exact in every dtype.
AMAX_FLOOR = 2.0**-100

# NaN is made from its bits inside the kernels: a NaN constexpr global never
# equals itself, which Triton's check of globals across kernels rejects.
_NAN_BITS = tl.constexpr(0x7FC00000)
INF = tl.constexpr(float("inf"))
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


def check_float_dtype(codec: str, dtype: torch.dtype, what: str = "input") -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"codec {codec!r}: {what} dtype {dtype} is not supported; accepted dtypes: {_FLOAT_NAMES}"
        )


def check_seed(codec: str, seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"codec {codec!r}: seed must be in [0, 2**63), got {seed}")


def tokens_channels(codec: str, shape: Sequence[int]) -> tuple[int, int]:
    """(tokens, channels): leading dims flatten into tokens, the last is the channel dim."""
    if len(shape) == 0:
        raise ValueError(
            f"codec {codec!r} quantises along the last dimension and needs a tensor with at "
            "least one dimension; got a 0-d tensor"
        )
    if shape[-1] == 0:
        raise ValueError(f"codec {codec!r} needs a non-empty last dimension; got shape {tuple(shape)}")
    return math.prod(shape[:-1]), shape[-1]


def check_input(codec: str, x: torch.Tensor, seed: int) -> tuple[int, int]:
    """A lossy codec's compress arguments; returns (tokens, channels)."""
    check_float_dtype(codec, x.dtype)
    check_seed(codec, seed)
    return tokens_channels(codec, x.shape)


def supports_float(shape: Sequence[int], dtype: torch.dtype) -> bool:
    """What every lossy codec here accepts: a float dtype, a non-empty last dimension."""
    return dtype in FLOAT_DTYPES and len(shape) >= 1 and shape[-1] > 0


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and values, NaN where the other is NaN (for checking payloads)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def check_payload(codec: str, what: str, t: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> None:
    if t.dtype != dtype or list(t.shape) != list(shape):
        raise ValueError(
            f"codec {codec!r}: payload {what} must be {dtype} of shape {list(shape)}, "
            f"got {t.dtype} of shape {list(t.shape)}"
        )


def num_groups(channels: int, group: int) -> int:
    return (channels + group - 1) // group


def cpu_noise(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) float32 noise for stochastic rounding, deterministic for ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen, device=device, dtype=torch.float32)


# --------------------------------------------------------------------------------------
# The group quantiser: reference and fast CPU path
# --------------------------------------------------------------------------------------


def _exact_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device.

    On CUDA, PyTorch divides by a Python number as a multiplication by its
    reciprocal, which is off by one ulp for some ``x``; a tensor divisor takes
    the true division, which the kernels' ``div_rn`` matches.
    """
    return x / torch.full_like(x, float(divisor))


def reference_quantize_groups(
    groups: torch.Tensor, qmax: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of ``groups`` (R, W) with its own scale.

    Returns float32 codes (R, W) in ``[-qmax, qmax]`` and float32 scales (R,).
    ``noise`` (R, W) uniform in [0, 1) selects stochastic rounding.
    """
    # Written for Inductor as much as for reading: on the CPU this definition is
    # inlined into the joint graph (passes/compress.py), and one abs-max
    # reduction plus one elementwise pass compile to about half the time of
    # separate finiteness and abs-max reductions. A group holding inf or NaN
    # has a non-finite abs-max (amax propagates NaN); its codes are 0 and its
    # scale NaN whatever its amax, so only finite groups need the exact amax.
    xf = groups.to(torch.float32)
    return quantize_by_amax(xf, xf.abs().amax(dim=1), qmax, noise, lambda g: g[:, None])


def quantize_by_amax(
    xf: torch.Tensor, amax: torch.Tensor, qmax: int, noise: torch.Tensor | None, spread
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``xf`` (float32) and scales, from each group's abs-max ``amax``.

    ``spread`` maps a per-group tensor to one that broadcasts against ``xf``
    (``g[:, None]`` for rows that are groups; an index by channel for groups
    laid along a row). The arithmetic of :func:`reference_quantize_groups`.
    """
    group_finite = torch.isfinite(amax)
    amax = amax.clamp_min(AMAX_FLOOR)
    inv = torch.where(group_finite, torch.full_like(amax, float(qmax)) / amax, 0.0)
    scaled = xf * spread(inv)
    if noise is None:
        # |x| <= amax and inv = fl(qmax / amax) give |x * inv| <= qmax (1 + 2^-24)^2,
        # under qmax + 1/2: rounding to nearest cannot leave [-qmax, qmax].
        codes = torch.round(scaled)
    else:
        codes = torch.floor(scaled + noise).clamp(-qmax, qmax)
    codes = torch.where(spread(group_finite), codes, 0.0)
    scale = torch.where(group_finite, _exact_div(amax, qmax), float("nan"))
    return codes, scale


def fast_quantize_groups(
    groups: torch.Tensor, qmax: int, noise: torch.Tensor | None = None, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`reference_quantize_groups`, with fewer passes and temporaries.

    ``amax`` and ``amin`` propagate NaN, so a non-finite group shows up as a
    non-finite abs-max without a separate ``isfinite`` pass (``aminmax`` would
    read the input once, but measured 5-50x slower on CPU along short rows); the
    codes are computed in one float32 buffer updated in place (``groups``
    itself with ``inplace=True``, for a float32 scratch buffer the caller owns).
    """
    amax = torch.maximum(groups.amax(dim=1), groups.amin(dim=1).neg_()).to(torch.float32)
    group_finite = torch.isfinite(amax)
    amax.clamp_min_(AMAX_FLOOR)
    # inv = 0 on non-finite groups: their codes become 0 (finite * 0) or NaN
    # (inf * 0, NaN * 0), and the NaN ones are zeroed below.
    inv = torch.full_like(amax, float(qmax)).div_(amax).mul_(group_finite)
    if inplace:
        assert groups.dtype == torch.float32
        codes = groups.mul_(inv[:, None])
    else:
        codes = torch.mul(groups, inv[:, None])
        if codes.dtype != torch.float32:
            codes = codes.to(torch.float32)
    if noise is None:
        codes.round_()
    else:
        codes.add_(noise).floor_()
    codes.clamp_(-qmax, qmax).nan_to_num_(0.0)
    scale = torch.where(group_finite, _exact_div(amax, qmax), float("nan"))
    return codes, scale


def padded_groups(rows: torch.Tensor, group: int) -> torch.Tensor:
    """A float32 copy of ``rows`` (T, C), zero-padded to whole groups, as (T * G, group)."""
    tokens, channels = rows.shape
    width = num_groups(channels, group) * group
    buf = torch.empty(tokens, width, dtype=torch.float32, device=rows.device)
    buf[:, :channels].copy_(rows)
    buf[:, channels:].zero_()
    return buf.view(-1, group)


def padded_noise(tokens: int, channels: int, group: int, seed: int, device) -> torch.Tensor:
    """Noise drawn in the input's element order, laid out like :func:`padded_groups`."""
    noise = cpu_noise((tokens, channels), seed, device)
    pad = num_groups(channels, group) * group - channels
    return torch.nn.functional.pad(noise, (0, pad)).view(-1, group)


def dequantize_groups_into(
    out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group: int
) -> torch.Tensor:
    """``out[t, c] = codes[t, c] * scale[t, c // group]`` in float32, rounded once into ``out``.

    ``out`` and ``codes`` are (T, C), ``scale`` is (T, G). Whole groups and the
    partial last group are two broadcast multiplies, without expanding the scales.
    """
    channels = out.shape[1]
    full = channels // group
    if full:
        width = full * group
        torch.mul(
            codes[:, :width].unflatten(1, (full, group)),
            scale[:, :full, None],
            out=out[:, :width].unflatten(1, (full, group)),
        )
    if channels > full * group:
        torch.mul(codes[:, full * group :], scale[:, full : full + 1], out=out[:, full * group :])
    return out


# --------------------------------------------------------------------------------------
# Triton helpers (called from the codecs' kernels)
# --------------------------------------------------------------------------------------


@triton.jit
def nonfinite(x):
    """True where x is NaN or +-inf (NaN fails every comparison)."""
    return ~(tl.abs(x) <= _FLT_MAX)


@triton.jit
def group_stats(x):
    """Per row of a 2-D block: (abs-max over the finite values, count of non-finite > 0 as int32)."""
    bad = nonfinite(x)
    amax = tl.max(tl.where(bad, 0.0, tl.abs(x)), axis=1)
    return amax, tl.max(bad.to(tl.int32), axis=1)


@triton.jit
def group_scales(amax, bad, QMAX: tl.constexpr):
    """(inv, scale) from a group's finite abs-max; NaN scale for non-finite groups."""
    amax = tl.maximum(amax, _AMAX_FLOOR)
    inv = tl.math.div_rn(tl.full(amax.shape, QMAX, tl.float32), amax)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    nan = tl.full(scale.shape, _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    scale = tl.where(bad, nan, scale)
    return inv, scale


# Compress kernels launch with enable_fp_fusion=False: a fused x * inv - floor(...)
# would round the exact product rather than the float32 product the reference
# rounds, and differ from it on rare ties.
@triton.jit
def round_half_even(y):
    # libdevice's rint is not available under TRITON_INTERPRET; floor plus an
    # exact tie test gives the same result for every float32 (y - floor(y) is exact).
    r = tl.floor(y)
    frac = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return r + up.to(tl.float32)


@triton.jit
def quantize_codes(scaled, bad, seed, offsets, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr):
    """float32 codes in [-QMAX, QMAX]; 0 where ``bad`` (the group's scale is NaN)."""
    if STOCHASTIC:
        # int32 offsets: the noise stream repeats past 2**31 elements.
        codes = tl.floor(scaled + tl.rand(seed, offsets.to(tl.int32)))
    else:
        codes = round_half_even(scaled)
    codes = tl.minimum(tl.maximum(codes, -QMAX), QMAX)
    return tl.where(bad, 0.0, codes)


def grid_1d(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------

# On a GPU, tensors of at least this many elements pick their kernels' launch
# configuration by timing the candidates once per shape class: these kernels
# move bytes, and how many a thread keeps in flight decides their speed.
# Smaller tensors (and CPU tensors under the interpreter) take the first
# candidate, the default.
TUNE_MIN_ELEMS = 1 << 22
_MAX_WARPS = 16

_tuned: dict[tuple, dict] = {}
# Tests set this to run every candidate (index clamped to the list).
FORCE_CANDIDATE: int | None = None


def tile_candidates(
    rows: int, cols: int, *, max_block_c: int, tile: int = 4096, per_thread: Sequence[int] = (32, 16, 64)
) -> list[dict]:
    """Launch configurations of a (BLOCK_T, BLOCK_C) tile kernel, the default first.

    One tile of about ``tile`` elements, as wide as the rows allow (up to
    ``max_block_c``), at the warp counts that give each thread ``per_thread``
    values. On an H200 (bfloat16, 4096 channels, 16M-256M elements) the
    fastest held 16-64 values a thread, against 8 in the first version's
    16-warp launches: more bytes in flight per thread.
    """
    block_c = min(triton.next_power_of_2(cols), max_block_c)
    block_t = max(1, min(triton.next_power_of_2(rows), tile // block_c))
    out: list[dict] = []
    for values in per_thread:
        warps = max(1, min(_MAX_WARPS, block_t * block_c // (32 * values)))
        cand = {"BLOCK_T": block_t, "BLOCK_C": block_c, "num_warps": warps}
        if cand not in out:
            out.append(cand)
    return out


def tile_grid(rows: int, cols: int, config: dict) -> tuple[int, int]:
    """The launch grid that covers (rows, cols) with ``config``'s tiles."""
    return triton.cdiv(rows, config["BLOCK_T"]), triton.cdiv(cols, config["BLOCK_C"])


def launch_tuned(
    name: str,
    key: tuple,
    candidates: Sequence[dict],
    launch: Callable[[dict], None],
    *,
    numel: int,
    device: torch.device,
) -> dict:
    """Run ``launch(config)`` with the best of ``candidates`` for this kernel and shape class.

    The first time a (kernel, ``key``, size class, device) is seen on a GPU
    with at least ``TUNE_MIN_ELEMS`` elements, every candidate is timed (each
    launch must be idempotent: the kernels only write their outputs) and the
    fastest is remembered for the process. Returns the configuration used.
    """
    if FORCE_CANDIDATE is not None:
        config = candidates[min(FORCE_CANDIDATE, len(candidates) - 1)]
    elif (
        device.type != "cuda"
        or numel < TUNE_MIN_ELEMS
        or len(candidates) == 1
        or torch.cuda.is_current_stream_capturing()
    ):
        config = candidates[0]
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        full_key = (name, key, numel.bit_length(), index)
        config = _tuned.get(full_key)
        if config is None:
            from triton.testing import do_bench

            times = [do_bench(lambda c=c: launch(c), warmup=5, rep=20, return_mode="median") for c in candidates]
            best = min(range(len(candidates)), key=times.__getitem__)
            config = _tuned[full_key] = dict(candidates[best])
            log.debug("%s %s: %s (%.1f us; default %.1f us)", name, key, config, times[best] * 1e3, times[0] * 1e3)
    launch(config)
    return config


def tuned_configs() -> dict[str, dict]:
    """What :func:`launch_tuned` chose so far, by ``kernel key size-class device``."""
    return {" ".join(map(str, k)): v for k, v in _tuned.items()}


# --------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------


# What a codec module provides, by name (``define_codec`` reads them).
CODEC_MODULE_API = (
    "NAME",
    "compress",
    "decompress",
    "compress_fake",
    "decompress_fake",
    "triton_compress",
    "triton_decompress",
    "reference_compress",
    "reference_decompress",
    "compressed_nbytes",
    "supports",
    "CODEC",
    "compress_op",
    "decompress_op",
)


def define_codec(module, payload_names: Sequence[str], *, lossless: bool, description: str):
    """Define a codec module's ``adacc::<NAME>_compress`` / ``_decompress`` ops and register it.

    The module provides ``NAME`` and, by these names: ``compress`` and
    ``decompress`` (the default kernels: plain torch ops, so they run on any
    device), ``triton_compress`` and ``triton_decompress`` (the CUDA kernels),
    ``compress_fake`` and ``decompress_fake``, ``reference_compress``,
    ``reference_decompress``, ``compressed_nbytes`` and ``supports``.

    A torch schema cannot return a one-element tuple, so a codec with a single
    payload returns ``Tensor[]`` (a one-element list): ``result[i]`` and
    ``*result`` work the same for every codec.
    """
    name = module.NAME
    outs = "Tensor[]" if len(payload_names) == 1 else "(" + ", ".join("Tensor" for _ in payload_names) + ")"
    comp = torch.library.custom_op(
        f"adacc::{name}_compress",
        module.compress,
        mutates_args=(),
        schema=f"(Tensor x, bool stochastic=False, int seed=0) -> {outs}",
    )
    comp.register_fake(module.compress_fake)
    comp.register_kernel("cuda", module.triton_compress)
    args = ", ".join(f"Tensor {p}" for p in payload_names)
    dec = torch.library.custom_op(
        f"adacc::{name}_decompress",
        module.decompress,
        mutates_args=(),
        schema=f"({args}, SymInt[] shape, ScalarType dtype) -> Tensor",
    )
    dec.register_fake(module.decompress_fake)
    dec.register_kernel("cuda", module.triton_decompress)
    ops = torch.ops.adacc
    return register_codec(
        Codec(
            name=name,
            lossless=lossless,
            num_payloads=len(payload_names),
            compress_op=getattr(ops, f"{name}_compress").default,
            decompress_op=getattr(ops, f"{name}_decompress").default,
            reference_compress=module.reference_compress,
            reference_decompress=module.reference_decompress,
            compressed_nbytes=module.compressed_nbytes,
            supports=module.supports,
            description=description,
        )
    )
