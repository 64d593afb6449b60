"""The codecs' Triton kernels, run by the Triton interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before triton is imported, and the rest of
the suite imports triton with it unset, so the checks run in one subprocess:
this file is also the script that subprocess runs (``python
tests/test_codecs_triton.py``), held to the plain-PyTorch references:

* payloads bit-exact under round-to-nearest, on small and odd shapes, float32 /
  bfloat16 / float16 inputs, non-finite and all-zero rows included;
* decompress bit-exact for float32 and float16 outputs. The interpreter's
  float32 -> bfloat16 cast truncates instead of rounding to nearest even (the
  GPU rounds, and ``bench/gpu/codecs.py`` checks that exactly), so bfloat16
  outputs are checked to within one bfloat16 step;
* stochastic rounding: deterministic for a seed, within one quantisation step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"

import torch

SHAPES = [(1, 1), (3, 37), (2, 5, 96), (7, 200)]
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _special_rows(channels: int) -> torch.Tensor:
    """An all-zero row, a row with +inf, one with NaN, one with -inf, one tiny, one normal."""
    x = torch.randn(6, channels)
    x[0] = 0.0
    x[1, channels // 2] = float("inf")
    x[2, 0] = float("nan")
    x[3, channels - 1] = float("-inf")
    x[4] *= 1e-35
    return x


def _inputs():
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for dtype in FLOATS:
            yield torch.randn(shape, generator=gen).mul(3.0).to(dtype)
    # non-contiguous input
    yield torch.randn(40, 6, generator=gen).t()
    for dtype in FLOATS:
        yield _special_rows(45).to(dtype)


def _equal_payloads(a, b) -> bool:
    from adacc_compiler.triton_kernels._common import same_values

    return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))


def _check_lossy(mod, qmax: int, extra_kwargs=()) -> list[str]:
    failures = []
    for x in _inputs():
        shape, where = list(x.shape), f"{mod.NAME} {tuple(x.shape)} {x.dtype}"
        ref = mod.reference_compress(x)
        for kwargs in ({}, *extra_kwargs):
            got = mod.triton_compress(x, **kwargs)
            if not _equal_payloads(got, ref):
                failures.append(f"{where} {kwargs}: compress payloads differ from the reference")
        for out_dtype in FLOATS:
            got = mod.triton_decompress(*ref, shape, out_dtype)
            want = mod.reference_decompress(*ref, shape, out_dtype)
            if out_dtype == torch.bfloat16:
                # one bfloat16 step: the interpreter truncates float32 -> bfloat16
                close = torch.isclose(got.float(), want.float(), rtol=2**-7, atol=0.0, equal_nan=True).all()
                if not (close and got.shape == want.shape and got.is_contiguous()):
                    failures.append(f"{where} -> {out_dtype}: decompress off by more than one bfloat16 step")
            elif not (_equal_payloads([got], [want]) and got.is_contiguous()):
                failures.append(f"{where} -> {out_dtype}: decompress differs from the reference")
        finite_rows = torch.isfinite(x.float()).all(dim=-1, keepdim=True)
        amax = x.float().nan_to_num(0.0, 0.0, 0.0).abs().amax(dim=-1, keepdim=True)
        first = mod.triton_compress(x, stochastic=True, seed=7)
        if not _equal_payloads(first, mod.triton_compress(x, stochastic=True, seed=7)):
            failures.append(f"{where}: stochastic rounding not deterministic for a seed")
        dec = mod.triton_decompress(*first, shape, torch.float32)
        err = torch.where(finite_rows, (dec - x.float()).abs(), 0.0)
        # plus the float32 rounding of the decoded value (matters at int12's steps)
        if (err > amax / qmax * 1.0001 + 1e-30 + x.float().nan_to_num(0.0, 0.0, 0.0).abs() * 2.0**-22).any():
            failures.append(f"{where}: stochastic rounding off by more than one step")
        if torch.isfinite(dec[~torch.isfinite(x.float())]).any():
            failures.append(f"{where}: a non-finite value decoded to a finite one")
    return failures


def _check_outlier_channels(mod) -> list[str]:
    """Outlier channels found by the kernels, ties and non-finite channels included."""
    failures = []
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 300, generator=gen)
    x[:, [7, 150]] *= 50.0
    x[4, 299] = float("nan")
    x[:, 20] = x[:, 21] = 1000.0  # a tie: the lower index wins
    for dtype in FLOATS:
        xd = x.to(dtype)
        got, want = mod.triton_compress(xd, absmax_splits=2), mod.reference_compress(xd)
        if not _equal_payloads(got, want) or got[2].tolist() != [20, 21, 299]:
            failures.append(f"{mod.NAME} {dtype}: outlier channels {got[2].tolist()}, expected [20, 21, 299]")
    return failures


def _check_bool1(mod) -> list[str]:
    """Bit-exact against the reference, every byte pattern included."""
    failures = []
    gen = torch.Generator().manual_seed(8)
    patterns = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool().reshape(-1)
    cases = [torch.rand(s, generator=gen) > 0.5 for s in [(), (1,), (9,), *SHAPES]]
    cases += [patterns, (torch.rand(40, 6, generator=gen) > 0.5).t()]
    for x in cases:
        got, want = mod.triton_compress(x), mod.reference_compress(x)
        if not _equal_payloads(got, want):
            failures.append(f"bool1 {tuple(x.shape)}: compress differs from the reference")
        y = mod.triton_decompress(*want, list(x.shape), torch.bool)
        if not (y.dtype == torch.bool and torch.equal(y, x)):
            failures.append(f"bool1 {tuple(x.shape)}: decompress is not the input")
    return failures


def _check_bf16(mod) -> list[str]:
    """PyTorch's rounding to nearest even bit for bit, and stochastic rounding to a neighbour."""
    failures = []
    gen = torch.Generator().manual_seed(9)
    special = _special_rows(45)
    special[4, :3] = torch.tensor([1e-40, 3.4e38, 1.0 + 2**-8])  # a subnormal, past bfloat16's max, a tie
    cases = [torch.randn(s, generator=gen).mul(3.0) for s in [(), (1,), *SHAPES, (3, 1500)]]
    cases += [special, torch.randn(40, 6, generator=gen).t()]
    for x in cases:
        where = f"bf16 {tuple(x.shape)}"
        (h,) = mod.triton_compress(x)
        # Bit for bit but NaN's payload bits (PyTorch's CPU conversion makes 0xFFFF).
        if not _equal_payloads([h], mod.reference_compress(x)):
            failures.append(f"{where}: compress differs from the reference")
        out = mod.triton_decompress(h, list(x.shape), torch.float32)
        if not (_equal_payloads([out], [h.float()]) and out.is_contiguous()):
            failures.append(f"{where}: decompress differs from the reference")
        (a,) = mod.triton_compress(x, stochastic=True, seed=7)
        if not _equal_payloads([a], mod.triton_compress(x, stochastic=True, seed=7)):
            failures.append(f"{where}: stochastic rounding not deterministic for a seed")
        finite = torch.isfinite(x)
        down = x.contiguous().view(torch.int32).long() & ~0xFFFF
        got = a.float().view(torch.int32).long()
        if not ((got == down) | (got == down + 0x10000))[finite].all():
            failures.append(f"{where}: stochastic rounding not to a neighbouring bfloat16")
        if not _equal_payloads([a[~finite]], [x[~finite].to(torch.bfloat16)]):
            failures.append(f"{where}: stochastic rounding changed a non-finite value")
    return failures


def _check_every_candidate() -> list[str]:
    """Every launch configuration a GPU may pick computes the reference's result.

    On a GPU, large tensors time the candidates and keep the fastest; here each
    one is forced in turn, on shapes that take the single-pass and the looping
    paths and partial tiles.
    """
    from adacc_compiler.triton_kernels import _common as cm
    from adacc_compiler.triton_kernels import bool1, int4_group, int8_group, int8_token, int12_token

    failures = []
    gen = torch.Generator().manual_seed(11)
    floats = [torch.randn(5, 300, generator=gen).to(torch.bfloat16), torch.randn(3, 4100, generator=gen)]
    masks = [torch.rand(1001, generator=gen) > 0.5, torch.rand(3, 4100, generator=gen) > 0.5]
    try:
        for index in range(8):
            cm.FORCE_CANDIDATE = index
            for mod in (int12_token, int8_token, int8_group, int4_group):
                for x in floats:
                    where = f"{mod.NAME} {tuple(x.shape)} {x.dtype} candidate {index}"
                    ref = mod.reference_compress(x)
                    if not _equal_payloads(mod.triton_compress(x), ref):
                        failures.append(f"{where}: compress payloads differ from the reference")
                    got = mod.triton_decompress(*ref, list(x.shape), torch.float32)
                    if not _equal_payloads([got], [mod.reference_decompress(*ref, list(x.shape), torch.float32)]):
                        failures.append(f"{where}: decompress differs from the reference")
            for x in masks:
                packed = bool1.triton_compress(x)
                if not _equal_payloads(packed, bool1.reference_compress(x)):
                    failures.append(f"bool1 {tuple(x.shape)} candidate {index}: compress differs from the reference")
                if not torch.equal(bool1.triton_decompress(*packed, list(x.shape), torch.bool), x):
                    failures.append(f"bool1 {tuple(x.shape)} candidate {index}: decompress is not the input")
    finally:
        cm.FORCE_CANDIDATE = None
    return failures


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # numpy warns about the inf - inf and NaN arithmetic the non-finite cases exercise
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    from adacc_compiler.triton_kernels import bf16, bool1, int4_group, int8_group, int8_token, int12_token

    start = time.perf_counter()
    failures = []
    failures += _check_lossy(int12_token, int12_token.QMAX, extra_kwargs=({"max_block_h": 8},))
    failures += _check_lossy(int8_token, int8_token.QMAX, extra_kwargs=({"max_block_c": 16},))
    failures += _check_lossy(int8_group, int8_group.QMAX, extra_kwargs=({"absmax_splits": 3},))
    failures += _check_outlier_channels(int8_group)
    failures += _check_lossy(int4_group, int4_group.QMAX)
    failures += _check_bool1(bool1)
    failures += _check_bf16(bf16)
    failures += _check_every_candidate()
    for line in failures:
        print("FAIL", line)
    print(f"{len(failures)} failures in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


def _sm90_specialisations():
    """(kernel, signature, constexprs) covering every kernel, bfloat16 inputs (float32 for bf16)."""
    from adacc_compiler.triton_kernels import bf16, bool1, int4_group, int8_group, int8_token, int12_token

    for st in (False, True):
        yield bf16._compress_kernel, dict(x_ptr="*fp32", h_ptr="*bf16", N="i64", seed="i64"), dict(BLOCK=1024, STOCHASTIC=st)
    yield bf16._decompress_kernel, dict(h_ptr="*bf16", out_ptr="*fp32", N="i64"), dict(BLOCK=1024)

    sig = {
        "int8_token_compress": (int8_token._compress_kernel, dict(x_ptr="*bf16", q_ptr="*i8", scale_ptr="*fp32", T="i32", C="i32", seed="i64")),
        "int8_group_compress": (int8_group._compress_kernel, dict(x_ptr="*bf16", slot_ptr="*i32", q_ptr="*i8", scale_ptr="*fp32", val_ptr="*bf16", R="i32", G="i32", C="i32", K="i32", seed="i32")),
        "int12_token_compress": (int12_token._compress_kernel, dict(x_ptr="*bf16", lo_ptr="*u8", hi_ptr="*u8", scale_ptr="*fp32", T="i32", C="i32", H="i32", seed="i64")),
        "int4_group_compress": (int4_group._compress_kernel, dict(x_ptr="*bf16", packed_ptr="*u8", scale_ptr="*fp32", R="i32", G="i32", C="i32", NB="i32", seed="i32")),
    }
    for st in (False, True):
        for single in (True, False):
            fn, args = sig["int8_token_compress"]
            yield fn, args, dict(BLOCK_T=2, BLOCK_C=2048, SINGLE=single, QMAX=127, STOCHASTIC=st)
            fn, args = sig["int12_token_compress"]
            yield fn, args, dict(BLOCK_T=2, BLOCK_H=1024, SINGLE=single, QMAX=2047, STOCHASTIC=st)
        for name, qmax in (("int8_group_compress", 127), ("int4_group_compress", 7)):
            fn, args = sig[name]
            yield fn, args, dict(BLOCK_R=128, GROUP=32, QMAX=qmax, STOCHASTIC=st)
    yield int8_group._channel_absmax_kernel, dict(x_ptr="*bf16", part_ptr="*fp32", T="i32", C="i32", rows_per_split="i32"), dict(BLOCK_T=16, BLOCK_C=256)
    yield int8_token._decompress_kernel, dict(q_ptr="*i8", scale_ptr="*fp32", out_ptr="*bf16", T="i32", C="i32"), dict(BLOCK_T=4, BLOCK_C=1024)
    yield int12_token._decompress_kernel, dict(lo_ptr="*u8", hi_ptr="*u8", scale_ptr="*fp32", out_ptr="*bf16", T="i32", C="i32", H="i32"), dict(BLOCK_T=4, BLOCK_H=512)
    yield int8_group._decompress_kernel, dict(q_ptr="*i8", scale_ptr="*fp32", slot_ptr="*i32", val_ptr="*bf16", out_ptr="*bf16", T="i32", C="i32", G="i32", K="i32"), dict(BLOCK_T=4, BLOCK_C=1024, GROUP=32)
    yield int4_group._decompress_kernel, dict(packed_ptr="*u8", scale_ptr="*fp32", out_ptr="*bf16", T="i32", C="i32", G="i32", NB="i32"), dict(BLOCK_T=4, BLOCK_C=1024, GROUP=32)
    yield bool1._compress_kernel, dict(x_ptr="*u8", packed_ptr="*u8", N="i64", NB="i32"), dict(BLOCK_B=1024)
    yield bool1._decompress_kernel, dict(packed_ptr="*u8", out_ptr="*u8", N="i32", NB="i32"), dict(BLOCK_B=1024)


def test_triton_kernels_compile_for_sm90():
    """Every kernel through Triton's real compiler down to an sm_90 cubin, no GPU needed.

    The interpreter does not type-check like the compiler (a NaN constexpr
    global, for one, passes there and fails here).
    """
    import pytest
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    for fn, args, consts in _sm90_specialisations():
        signature = {name: args.get(name, "constexpr") for name in fn.arg_names}
        kernel = triton.compile(
            ASTSource(fn, signature, consts),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 8, "enable_fp_fusion": False},
        )
        assert kernel.asm["cubin"], fn.__name__


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


if __name__ == "__main__":
    sys.exit(main())
