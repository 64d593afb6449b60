"""``int8_group``: int8 with one float32 scale per 32 channels, outlier channels kept exact.

For norm inputs and tensors next to the residual stream, where a few feature
dimensions are far larger than the rest (LLM.int8's outlier channels). One
scale for such a channel's whole group would flatten its 31 neighbours, so:

1. the ``k = ceil(C / 128)`` channels with the largest abs-max over the whole
   tensor (all tokens) are outlier channels (ties go to the lower index;
   NaN and infinities count as infinitely large, so up to ``k`` non-finite
   channels are kept exactly);
2. their values are stored unchanged (input dtype) with their indices, and they
   are zeroed in the tensor that is quantised;
3. the rest is quantised in groups of 32 consecutive channels per token with
   ``scale = amax / 127`` (see ``_common`` for the exact arithmetic, the
   all-zero floor, stochastic rounding and non-finite groups). A last dim that
   is not a multiple of 32 ends in a partial group (its own abs-max, as if
   padded with zeros).

Payloads, for an input of shape ``(*lead, C)``, ``G = ceil(C / 32)``:

* ``q``: int8 ``(*lead, C)``; 0 in the outlier channels;
* ``scale``: float32 ``(*lead, G)``; NaN for a group holding a NaN or infinity
  outside the outlier channels (the group decodes to NaN);
* ``idx``: int32 ``(k,)``, the outlier channels in increasing order;
* ``val``: input dtype ``(*lead, k)``, their values.

Compressed size: ``T*C + 4*T*G + 4*k + T*k*itemsize`` bytes for ``T`` tokens.

Finding the outlier channels is a statistic of the whole tensor, so the GPU path
reads the input twice: a reduction kernel for the per-channel abs-max, then one
fused kernel that gathers the outliers, computes each group's scale, quantises
and stores.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import triton
import triton.language as tl

from adacc_compiler.triton_kernels import _common as cm

NAME = "int8_group"
QMAX = 127
GROUP = 32
CHANNELS_PER_OUTLIER = 128

__all__ = [*cm.CODEC_MODULE_API, "QMAX", "GROUP", "num_outliers", "select_outliers"]


def num_outliers(channels: int) -> int:
    """Outlier channels kept exactly: ``ceil(C / 128)`` (at least one for any C >= 1)."""
    return (channels + CHANNELS_PER_OUTLIER - 1) // CHANNELS_PER_OUTLIER


def _payload_shapes(shape: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    channels = shape[-1]
    k = num_outliers(channels)
    lead = list(shape[:-1])
    return list(shape), lead + [cm.num_groups(channels, GROUP)], [k], lead + [k]


def _check_payloads(q, scale, idx, val, shape, dtype) -> tuple[int, int]:
    cm.check_float_dtype(NAME, dtype, "output")
    tokens, channels = cm.tokens_channels(NAME, shape)
    q_shape, scale_shape, idx_shape, val_shape = _payload_shapes(shape)
    cm.check_payload(NAME, "q", q, torch.int8, q_shape)
    cm.check_payload(NAME, "scale", scale, torch.float32, scale_shape)
    cm.check_payload(NAME, "idx", idx, torch.int32, idx_shape)
    cm.check_float_dtype(NAME, val.dtype, "payload val")
    cm.check_payload(NAME, "val", val, val.dtype, val_shape)
    return tokens, channels


def compressed_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    cm.check_float_dtype(NAME, dtype)
    tokens, channels = cm.tokens_channels(NAME, shape)
    k = num_outliers(channels)
    return tokens * channels + 4 * tokens * cm.num_groups(channels, GROUP) + 4 * k + tokens * k * dtype.itemsize


def supports(shape: Sequence[int], dtype: torch.dtype) -> bool:
    return cm.supports_float(shape, dtype)


def select_outliers(channel_absmax: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest channels, ties to the lower index, as sorted int32 indices.

    A stable sort makes the tie order the same on every device (``topk`` does not
    promise one); ``channel_absmax`` must hold no NaN.
    """
    order = torch.sort(channel_absmax, descending=True, stable=True).indices[:k]
    return order.sort().values.to(torch.int32)


def _slot_map(idx: torch.Tensor, channels: int) -> torch.Tensor:
    """(C,) int32: the outlier slot of each channel, -1 for the quantised ones."""
    slot = torch.full((channels,), -1, dtype=torch.int32, device=idx.device)
    slot[idx.long()] = torch.arange(idx.numel(), dtype=torch.int32, device=idx.device)
    return slot


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------


def reference_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    tokens, channels = cm.check_input(NAME, x, seed)
    rows = x.reshape(tokens, channels)
    xf = rows.to(torch.float32)
    magnitude = torch.where(torch.isfinite(xf), xf.abs(), float("inf"))
    channel_absmax = magnitude.amax(dim=0) if tokens else xf.new_zeros(channels)
    idx = select_outliers(channel_absmax, num_outliers(channels))
    val = rows[:, idx.long()]
    rest = xf.clone()
    rest[:, idx.long()] = 0.0
    noise = cm.cpu_noise((tokens, channels), seed, x.device) if stochastic else None
    codes, scale = _quantize_rows(rest, noise)
    q = codes.to(torch.int8)
    q_shape, scale_shape, _, val_shape = _payload_shapes(x.shape)
    return q.reshape(q_shape), scale.reshape(scale_shape), idx, val.reshape(val_shape)


def _quantize_rows(rest: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (T, C) and scales (T, G) of ``rest`` (float32, outliers zeroed).

    A partial last group takes the abs-max of its own channels (what zero
    padding to a whole group would give) and each channel its group's scale
    by index (:func:`~adacc_compiler.triton_kernels._common.quantize_by_amax`).
    Written for Inductor as much as for reading: zero-padded to whole groups,
    Inductor 2.13's CPU code computed wrong codes in the padded group, and
    quantising the partial group apart and concatenating ran 4x slower.
    """
    tokens, channels = rest.shape
    full = channels // GROUP
    width = full * GROUP
    if channels == width:
        codes, scale = cm.reference_quantize_groups(
            rest.reshape(-1, GROUP), QMAX, None if noise is None else noise.reshape(-1, GROUP)
        )
        return codes.reshape(tokens, channels), scale.reshape(tokens, full)
    tail = rest[:, width:].abs().amax(dim=1, keepdim=True)
    amax = torch.cat([rest[:, :width].reshape(tokens, full, GROUP).abs().amax(dim=2), tail], dim=1) if full else tail
    group_of = torch.arange(channels, device=rest.device) // GROUP
    return cm.quantize_by_amax(rest, amax, QMAX, noise, lambda g: g[:, group_of])


def reference_decompress(q, scale, idx, val, shape: Sequence[int], dtype: torch.dtype):
    tokens, channels = _check_payloads(q, scale, idx, val, shape, dtype)
    # Each channel's scale by index, as the encode spreads them.
    group_of = torch.arange(channels, device=q.device) // GROUP
    y = q.reshape(tokens, channels).to(torch.float32) * scale.reshape(tokens, -1)[:, group_of]
    y[:, idx.long()] = val.reshape(tokens, idx.numel()).to(torch.float32)
    return y.reshape(list(shape)).to(dtype)


# --------------------------------------------------------------------------------------
# Fast torch path (CPU, and any device without Triton)
# --------------------------------------------------------------------------------------


def compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    tokens, channels = cm.check_input(NAME, x, seed)
    rows = x.contiguous().view(tokens, channels)
    if tokens:
        channel_absmax = torch.maximum(rows.amax(dim=0), rows.amin(dim=0).neg_())
        channel_absmax = channel_absmax.to(torch.float32).nan_to_num_(nan=float("inf"), posinf=float("inf"))
    else:
        channel_absmax = torch.zeros(channels, device=x.device)
    idx = select_outliers(channel_absmax, num_outliers(channels))
    val = rows.index_select(1, idx)
    width = cm.num_groups(channels, GROUP) * GROUP
    groups = cm.padded_groups(rows, GROUP)
    groups.view(tokens, width).index_fill_(1, idx.long(), 0.0)
    noise = cm.padded_noise(tokens, channels, GROUP, seed, x.device) if stochastic else None
    codes, scale = cm.fast_quantize_groups(groups, QMAX, noise, inplace=True)
    q = codes.view(tokens, width)[:, :channels].to(torch.int8)
    q_shape, scale_shape, _, val_shape = _payload_shapes(x.shape)
    return q.view(q_shape), scale.view(scale_shape), idx, val.view(val_shape)


def decompress(q, scale, idx, val, shape: Sequence[int], dtype: torch.dtype):
    tokens, channels = _check_payloads(q, scale, idx, val, shape, dtype)
    out = torch.empty(list(shape), dtype=dtype, device=q.device)
    flat = out.view(tokens, channels)
    groups = cm.num_groups(channels, GROUP)
    cm.dequantize_groups_into(flat, q.reshape(tokens, channels), scale.reshape(tokens, groups), GROUP)
    flat.index_copy_(1, idx.long(), val.reshape(tokens, idx.numel()).to(dtype))
    return out


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _channel_absmax_kernel(x_ptr, part_ptr, T, C, rows_per_split, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[split, c] = max |x[t, c]| over the split's tokens; non-finite counts as inf."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    t_start = split * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    # Element-wise maxima in registers; one reduction across the tile's rows at
    # the end rather than one per step (each is a round trip through shared memory).
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < t_end)[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.where(cm.nonfinite(x), cm.INF, tl.abs(x)))
    tl.store(part_ptr + split * C + cols, tl.max(acc, axis=0), mask=cols < C)


@triton.jit(do_not_specialize=["seed"])
def _compress_kernel(
    x_ptr, slot_ptr, q_ptr, scale_ptr, val_ptr, R, G, C, K, seed,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    # One row of the block is one group: r = token * G + group.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    token = (r // G).to(tl.int64)
    cols = (r % G)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (r < R)[:, None] & (cols < C)
    offs = token[:, None] * C + cols
    raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
    slot = tl.load(slot_ptr + cols, mask=mask, other=-1)
    outlier = slot >= 0
    tl.store(val_ptr + token[:, None] * K + slot, raw, mask=mask & outlier)
    x = tl.where(outlier, 0.0, raw.to(tl.float32))
    amax, nbad = cm.group_stats(x)
    inv, scale = cm.group_scales(amax, nbad > 0, QMAX)
    codes = cm.quantize_codes(x * inv[:, None], (nbad > 0)[:, None], seed, offs, QMAX, STOCHASTIC)
    tl.store(q_ptr + offs, codes.to(tl.int8), mask=mask)
    tl.store(scale_ptr + r, scale, mask=r < R)


@triton.jit
def _decompress_kernel(
    q_ptr, scale_ptr, slot_ptr, val_ptr, out_ptr, T, C, G, K,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < T)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    offs = rows64 * C + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows64 * G + (cols // GROUP)[None, :], mask=mask, other=0.0)
    slot = tl.load(slot_ptr + cols, mask=col_ok, other=-1)[None, :]
    outlier = mask & (slot >= 0)
    val = tl.load(val_ptr + rows64 * K + slot, mask=outlier, other=0.0).to(tl.float32)
    y = tl.where(outlier, val, q * scale)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _channel_absmax(x2: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    tokens, channels = x2.shape
    sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 1
    result: list[torch.Tensor] = []

    def launch(c: dict) -> None:
        block_t, block_c = c["BLOCK_T"], c["BLOCK_C"]
        col_blocks = triton.cdiv(channels, block_c)
        n = splits
        if n is None and x2.is_cuda:
            # enough programs to fill the device: about four per SM
            n = max(1, min(triton.cdiv(tokens, block_t), triton.cdiv(4 * sms, col_blocks)))
        n = min(n or 1, tokens)
        rows_per_split = triton.cdiv(tokens, n)
        part = torch.empty(n, channels, dtype=torch.float32, device=x2.device)
        _channel_absmax_kernel[(col_blocks, n)](
            x2, part, tokens, channels, rows_per_split, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=c["num_warps"]
        )
        result[:] = [part]

    candidates = cm.tile_candidates(tokens, channels, max_block_c=512)
    cm.launch_tuned(f"{NAME}.absmax", (channels, x2.dtype, splits), candidates, launch, numel=x2.numel(), device=x2.device)
    return result[0].amax(dim=0)


def triton_compress(x: torch.Tensor, stochastic: bool = False, seed: int = 0, *, absmax_splits: int | None = None):
    """The Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``absmax_splits``: token ranges the channel abs-max is split into (default:
    enough to fill the GPU; one on CPU).
    """
    tokens, channels = cm.check_input(NAME, x, seed)
    x = x.contiguous()
    q_shape, scale_shape, _, val_shape = _payload_shapes(x.shape)
    k = num_outliers(channels)
    q = torch.empty(q_shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    val = torch.empty(val_shape, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return q, scale, torch.arange(k, dtype=torch.int32, device=x.device), val
    x2 = x.view(tokens, channels)
    idx = select_outliers(_channel_absmax(x2, absmax_splits), k)
    groups = cm.num_groups(channels, GROUP)
    rows = tokens * groups
    slot = _slot_map(idx, channels)

    def launch(c: dict) -> None:
        _compress_kernel[cm.grid_1d(rows, c["BLOCK_T"])](
            x2, slot, q, scale, val, rows, groups, channels, k, seed,
            BLOCK_R=c["BLOCK_T"], GROUP=GROUP, QMAX=QMAX, STOCHASTIC=bool(stochastic), enable_fp_fusion=False,
            num_warps=c["num_warps"],
        )

    # One block row is one group: tiles of (groups, GROUP).
    candidates = cm.tile_candidates(rows, GROUP, max_block_c=GROUP)
    key = (channels, x.dtype, bool(stochastic))
    cm.launch_tuned(f"{NAME}.compress", key, candidates, launch, numel=x.numel(), device=x.device)
    return q, scale, idx, val


def triton_decompress(q, scale, idx, val, shape: Sequence[int], dtype: torch.dtype):
    """The Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    tokens, channels = _check_payloads(q, scale, idx, val, shape, dtype)
    out = torch.empty(list(shape), dtype=dtype, device=q.device)
    if tokens == 0:
        return out
    q, scale, val = q.contiguous(), scale.contiguous(), val.contiguous()
    slot, groups = _slot_map(idx, channels), cm.num_groups(channels, GROUP)

    def launch(c: dict) -> None:
        _decompress_kernel[cm.tile_grid(tokens, channels, c)](
            q, scale, slot, val, out, tokens, channels, groups, idx.numel(),
            BLOCK_T=c["BLOCK_T"], BLOCK_C=c["BLOCK_C"], GROUP=GROUP, num_warps=c["num_warps"],
        )

    candidates = cm.tile_candidates(tokens, channels, max_block_c=4096, per_thread=(16, 32, 64))
    cm.launch_tuned(f"{NAME}.decompress", (channels, dtype), candidates, launch, numel=out.numel(), device=out.device)
    return out


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def compress_fake(x: torch.Tensor, stochastic: bool = False, seed: int = 0):
    cm.check_input(NAME, x, seed)
    q_shape, scale_shape, idx_shape, val_shape = _payload_shapes(x.shape)
    return (
        x.new_empty(q_shape, dtype=torch.int8),
        x.new_empty(scale_shape, dtype=torch.float32),
        x.new_empty(idx_shape, dtype=torch.int32),
        x.new_empty(val_shape),
    )


def decompress_fake(q, scale, idx, val, shape: Sequence[int], dtype: torch.dtype):
    cm.check_float_dtype(NAME, dtype, "output")
    return q.new_empty(list(shape), dtype=dtype)


CODEC = cm.define_codec(
    sys.modules[__name__],
    ("q", "scale", "idx", "val"),
    lossless=False,
    description="int8, float32 scale per 32 channels, top ceil(C/128) abs-max channels kept exact; "
    "for norm inputs and the residual stream",
)
compress_op, decompress_op = CODEC.compress_op, CODEC.decompress_op
