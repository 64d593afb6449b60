"""Codecs: CPU ops against the references, op checks, round trips, accuracy, edge cases.

The Triton kernels are checked under the interpreter in ``test_codecs_triton.py``.
Figures measured on Gaussian data (float32, seed 0) are quoted next to the floors
they back.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from adacc_compiler.triton_kernels import _common as cm
from adacc_compiler.triton_kernels import CODECS, get_codec
from adacc_compiler.triton_kernels.registry import roundtrip

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
LOSSY = {"int12_token": 2047, "int8_token": 127, "int8_group": 127, "int4_group": 7}
ODD_SHAPES = [(1, 1), (3, 37), (2, 5, 96), (7, 200), (33,)]


def _sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return 10.0 * math.log10(x.pow(2).sum().item() / (x - y).pow(2).sum().item())


_same_values = cm.same_values


def _equal_payloads(a, b) -> bool:
    return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))


def _as_tuple(payload):
    return (payload,) if isinstance(payload, torch.Tensor) else tuple(payload)


def _random_input(gen: torch.Generator, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.randn(shape, generator=gen).mul(2.0).to(dtype)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def test_every_codec_registered():
    assert set(CODECS) >= {"int12_token", "int8_token", "int8_group", "int4_group", "bf16", "bool1"}


@pytest.mark.parametrize("name", [*sorted(LOSSY), "bf16", "bool1"])
def test_registered_with_contract(name):
    codec = get_codec(name)
    assert codec.name == name and codec.lossless == (name == "bool1")
    assert str(codec.compress_op) == f"adacc.{name}_compress.default"
    assert str(codec.decompress_op) == f"adacc.{name}_decompress.default"
    schema = codec.compress_op._schema
    assert [a.name for a in schema.arguments] == ["x", "stochastic", "seed"]
    if codec.num_payloads == 1:
        assert str(schema.returns[0].type) == "List[Tensor]"
    else:
        assert len(schema.returns) == codec.num_payloads
    dec_args = [a.name for a in codec.decompress_op._schema.arguments]
    assert dec_args[-2:] == ["shape", "dtype"] and len(dec_args) == codec.num_payloads + 2
    x = torch.zeros(3, 40, dtype=torch.bool if codec.lossless else torch.float32)
    payload = codec.compress_op(x)
    assert len(payload) == codec.num_payloads
    assert torch.equal(roundtrip(codec, x), x)


# --------------------------------------------------------------------------------------
# CPU path against the reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSY))
@pytest.mark.parametrize("dtype", FLOATS)
def test_cpu_ops_match_reference(name, dtype):
    codec = get_codec(name)
    gen = torch.Generator().manual_seed(1)
    cases = [_random_input(gen, dtype, s) for s in ODD_SHAPES]
    cases.append(_random_input(gen, dtype, (40, 6)).t())  # non-contiguous
    cases.append(_random_input(gen, dtype, (4, 6, 10)).transpose(0, 2))
    special = _random_input(gen, dtype, (6, 70))
    special[1, 3], special[2, 69], special[3, 0], special[4] = float("inf"), float("nan"), float("-inf"), 0.0
    cases.append(special)  # non-finite rows and an all-zero row take their own path in the reference
    for x in cases:
        for stochastic, seed in ((False, 0), (True, 0), (True, 12345)):
            got = _as_tuple(codec.compress_op(x, stochastic, seed))
            want = _as_tuple(codec.reference_compress(x, stochastic, seed))
            assert _equal_payloads(got, want), (x.shape, stochastic, seed)
            assert all(p.is_contiguous() for p in got)
            for out_dtype in FLOATS:
                dec = codec.decompress_op(*got, list(x.shape), out_dtype)
                ref = codec.reference_decompress(*want, list(x.shape), out_dtype)
                assert _same_values(dec, ref) and dec.is_contiguous(), (x.shape, out_dtype)


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_compressed_nbytes_is_exact(name):
    codec = get_codec(name)
    for shape in ODD_SHAPES + [(4, 128, 64), (0, 8)]:
        for dtype in FLOATS:
            payload = _as_tuple(codec.compress_op(torch.zeros(shape, dtype=dtype)))
            assert len(payload) == codec.num_payloads
            assert codec.compressed_nbytes(shape, dtype) == sum(p.numel() * p.element_size() for p in payload)


# --------------------------------------------------------------------------------------
# torch.library.opcheck
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_opcheck(name):
    codec = get_codec(name)
    gen = torch.Generator().manual_seed(2)
    samples = [
        (torch.randn(3, 37, generator=gen), False, 0),
        (torch.randn(2, 40, 6, generator=gen).transpose(1, 2).to(torch.bfloat16), True, 5),
    ]
    for x, stochastic, seed in samples:
        torch.library.opcheck(codec.compress_op, (x, stochastic, seed))
        payload = _as_tuple(codec.compress_op(x, stochastic, seed))
        for out_dtype in (x.dtype, torch.float16):
            torch.library.opcheck(codec.decompress_op, (*payload, list(x.shape), out_dtype))


# --------------------------------------------------------------------------------------
# Round trips over random shapes, dtypes and seeds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_roundtrip_random_shapes(name):
    codec, qmax = get_codec(name), LOSSY[name]
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(25):
        ndim = rng.randint(1, 4)
        shape = [rng.randint(1, 7) for _ in range(ndim - 1)] + [rng.randint(1, 300)]
        dtype = rng.choice(FLOATS)
        stochastic = rng.random() < 0.5
        seed = rng.randrange(2**31)
        x = _random_input(gen, dtype, shape)
        if rng.random() < 0.3 and ndim >= 2:
            x = x.transpose(0, -1).contiguous().transpose(0, -1)  # same values, other strides
        assert codec.supports(shape, dtype)
        payload = _as_tuple(codec.compress_op(x, stochastic, seed))
        assert [p.shape for p in payload] == [p.shape for p in _as_tuple(codec.reference_compress(x))]
        y = codec.decompress_op(*payload, shape, torch.float32)
        assert y.shape == x.shape and y.dtype == torch.float32 and y.is_contiguous()
        # Error bound: half a step (one step stochastically) of the row's scale;
        # a group's scale never exceeds its row's.
        xf = x.float()
        step = xf.abs().amax(dim=-1, keepdim=True).clamp_min(2.0**-100) / qmax
        # Plus the float32 rounding of the decoded value (matters at int12's steps).
        bound = step * (1.0 if stochastic else 0.5) * (1 + 1e-5) + xf.abs() * 2.0**-22
        assert ((y - xf).abs() <= bound).all(), (shape, dtype, stochastic)
        z = codec.decompress_op(*payload, shape, dtype)
        assert z.dtype == dtype and torch.equal(z, y.to(dtype))


# --------------------------------------------------------------------------------------
# Accuracy on Gaussian data
# --------------------------------------------------------------------------------------

# Measured on N(0, 1), 512 x 1024, seed 0 (float32 / bfloat16 / float16 input):
# int8_token 42.1 / 41.8 / 42.1 dB, int8_group 45.5 / 45.1 / 45.5 dB,
# int4_group 20.3 / 20.3 / 20.3 dB, int12_token 66.2 / 71.8 / 65.6 dB.
SQNR_FLOORS_DB = {"int12_token": 64.0, "int8_token": 40.0, "int8_group": 43.0, "int4_group": 18.0}


@pytest.mark.parametrize("name", sorted(SQNR_FLOORS_DB))
@pytest.mark.parametrize("dtype", FLOATS)
def test_sqnr_floor_on_gaussian(name, dtype):
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = roundtrip(get_codec(name), x)
    assert _sqnr_db(x.float(), y.float()) >= SQNR_FLOORS_DB[name]


def _outlier_data() -> tuple[torch.Tensor, list[int]]:
    """Gaussian 512 tokens x 1024 channels; 0.1% of the channels (one) 100x larger."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=gen)
    channels = torch.randperm(1024, generator=gen)[: max(1, round(0.001 * 1024))].tolist()
    x[:, channels] *= 100.0
    return x, channels


def test_outlier_channels_keep_int8_group_accurate():
    x, channels = _outlier_data()
    codec = get_codec("int8_group")
    payload = codec.compress_op(x)
    assert set(channels) <= set(payload[2].tolist())
    with_outliers = _sqnr_db(x, roundtrip(codec, x))
    # The same int8 groups of 32 with the outliers left in their groups.
    groups, scale = cm.reference_quantize_groups(x.reshape(-1, 32), 127)
    no_handling = _sqnr_db(x, (groups * scale[:, None]).reshape(x.shape))
    per_token = _sqnr_db(x, roundtrip(get_codec("int8_token"), x))
    # Measured: 55.2 dB with outlier handling, 38.4 dB without, 23.3 dB per token
    # (the outlier channel's energy dominates the signal; see the check below).
    assert with_outliers >= 30.0
    assert no_handling <= with_outliers - 12.0
    assert per_token <= 30.0 and per_token <= with_outliers - 25.0
    # On the ordinary channels alone: 45.5 dB (as on plain Gaussian data) with
    # outlier handling, 28.7 dB without (the outlier's group loses its precision).
    rest = torch.ones(1024, dtype=torch.bool)
    rest[channels] = False
    handled = _sqnr_db(x[:, rest], roundtrip(codec, x)[:, rest])
    assert handled >= 43.0
    assert _sqnr_db(x[:, rest], (groups * scale[:, None]).reshape(x.shape)[:, rest]) <= handled - 12.0


# --------------------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_stochastic_rounding_unbiased_and_deterministic(name):
    codec = get_codec(name)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    first = _as_tuple(codec.compress_op(x, True, 11))
    assert _equal_payloads(first, _as_tuple(codec.compress_op(x, True, 11)))
    assert not _equal_payloads(first, _as_tuple(codec.compress_op(x, True, 12)))
    draws = torch.stack([
        codec.decompress_op(*_as_tuple(codec.compress_op(x, True, seed)), list(x.shape), torch.float32)
        for seed in range(200)
    ])
    rtn_err = (roundtrip(codec, x) - x).abs().mean()
    # Round-to-nearest errs by a quarter step on average; the mean of 200
    # stochastic draws by about 0.02 step (0.8 * 0.41 / sqrt(200)) when unbiased.
    assert (draws.mean(dim=0) - x).abs().mean() < 0.25 * rtn_err
    assert abs((draws.mean(dim=0) - x).mean()) < 0.05 * rtn_err
    assert (draws - x).abs().amax() > rtn_err  # it does round both ways


def test_stochastic_rounding_of_one_value():
    codec = get_codec("int8_token")
    # Each row: 127 fixes the scale at 1.0; 5.3 rounds to 5 or 6, to 5 at nearest.
    x = torch.full((4096, 64), 5.3)
    x[:, 0] = 127.0
    y = roundtrip(codec, x)[:, 1:]
    assert torch.all(y == 5.0)
    y = codec.decompress_op(*codec.compress_op(x, True, 3), list(x.shape), torch.float32)[:, 1:]
    assert set(y.unique().tolist()) == {5.0, 6.0}
    assert abs(y.mean().item() - 5.3) < 0.005  # 4096 * 63 draws: standard error 0.0009


# --------------------------------------------------------------------------------------
# Non-finite values, zeros
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSY))
@pytest.mark.parametrize("dtype", FLOATS)
def test_non_finite_never_decode_finite(name, dtype):
    codec = get_codec(name)
    x = torch.randn(5, 70)
    x[1, 3] = float("inf")
    x[2, 69] = float("nan")
    x[3, 0] = float("-inf")
    x = x.to(dtype)
    bad = ~torch.isfinite(x)
    for stochastic in (False, True):
        y = codec.decompress_op(*_as_tuple(codec.compress_op(x, stochastic, 1)), list(x.shape), dtype)
        assert not torch.isfinite(y[bad]).any()
        assert torch.isfinite(y[~bad.any(dim=-1)]).all()


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_all_zero_input(name):
    codec = get_codec(name)
    for dtype in FLOATS:
        x = torch.zeros(3, 65, dtype=dtype)
        payload = _as_tuple(codec.compress_op(x))
        assert all(not p.is_floating_point() or torch.isfinite(p).all() for p in payload)
        y = codec.decompress_op(*payload, list(x.shape), dtype)
        assert torch.equal(y, x)
        # denormal-sized rows neither overflow nor divide by zero
        tiny = torch.full((2, 8), 1e-40)
        assert torch.isfinite(roundtrip(codec, tiny)).all()


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_bad_dtype_and_shape_raise(name):
    codec = get_codec(name)
    for bad in (torch.int32, torch.float64, torch.bool):
        with pytest.raises(ValueError, match=rf"{name}.*float32, bfloat16, float16"):
            codec.compress_op(torch.zeros(2, 4, dtype=bad))
        with pytest.raises(ValueError, match=rf"{name}.*float32, bfloat16, float16"):
            codec.compressed_nbytes((2, 4), bad)
        assert not codec.supports((2, 4), bad)
    payload = _as_tuple(codec.compress_op(torch.zeros(2, 4)))
    with pytest.raises(ValueError, match=rf"{name}.*float32, bfloat16, float16"):
        codec.decompress_op(*payload, [2, 4], torch.int8)
    with pytest.raises(ValueError, match=name):
        codec.decompress_op(*payload, [2, 5], torch.float32)
    with pytest.raises(ValueError, match=rf"{name}.*0-d"):
        codec.compress_op(torch.tensor(1.0))
    with pytest.raises(ValueError, match=rf"{name}.*seed"):
        codec.compress_op(torch.zeros(2, 4), True, -1)
    assert not codec.supports((), torch.float32)
    assert not codec.supports((3, 0), torch.float32)


# --------------------------------------------------------------------------------------
# bool1
# --------------------------------------------------------------------------------------

BOOL_SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (3, 37), (2, 5, 96), (7, 200), (4, 0, 3)]


def _bool_cases():
    gen = torch.Generator().manual_seed(6)
    for shape in BOOL_SHAPES:
        yield torch.rand(shape, generator=gen) > 0.5
    yield (torch.rand(40, 6, generator=gen) > 0.3).t()  # non-contiguous
    yield (torch.rand(1001, generator=gen) > 0.5)[3:]  # contiguous, unaligned start
    yield torch.ones(64, dtype=torch.bool)


def test_bool1_matches_reference_bit_exact():
    codec = get_codec("bool1")
    for x in _bool_cases():
        (packed,) = codec.compress_op(x)
        (want,) = codec.reference_compress(x)
        assert packed.dtype == torch.uint8 and torch.equal(packed, want), x.shape
        assert packed.numel() == codec.compressed_nbytes(x.shape, torch.bool) == (x.numel() + 7) // 8
        y = codec.decompress_op(packed, list(x.shape), torch.bool)
        assert y.dtype == torch.bool and y.is_contiguous() and torch.equal(y, x)
        assert torch.equal(codec.reference_decompress(packed, list(x.shape), torch.bool), x)
        assert codec.supports(x.shape, torch.bool) == (x.numel() > 0)


def test_bool1_every_byte_pattern():
    codec = get_codec("bool1")
    patterns = torch.arange(256, dtype=torch.int64)
    bits = ((patterns[:, None] >> torch.arange(8)) & 1).bool()  # bit i of pattern p
    (packed,) = codec.compress_op(bits.reshape(-1))
    assert torch.equal(packed, patterns.to(torch.uint8))
    assert torch.equal(codec.decompress_op(packed, [256 * 8], torch.bool), bits.reshape(-1))


def test_bool1_opcheck():
    codec = get_codec("bool1")
    gen = torch.Generator().manual_seed(7)
    for x in ((torch.rand(3, 37, generator=gen) > 0.5), (torch.rand(16, 5, generator=gen) > 0.5).t()):
        torch.library.opcheck(codec.compress_op, (x, False, 0))
        torch.library.opcheck(codec.decompress_op, (*codec.compress_op(x), list(x.shape), torch.bool))


def test_bool1_errors():
    codec = get_codec("bool1")
    with pytest.raises(ValueError, match=r"bool1.*accepted dtypes: bool"):
        codec.compress_op(torch.zeros(8))
    with pytest.raises(ValueError, match=r"bool1.*accepted dtypes: bool"):
        codec.compressed_nbytes((8,), torch.uint8)
    (packed,) = codec.compress_op(torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool1.*accepted dtypes: bool"):
        codec.decompress_op(packed, [8], torch.float32)
    with pytest.raises(ValueError, match=r"bool1.*packed"):
        codec.decompress_op(packed, [9], torch.bool)
    assert not codec.supports((8,), torch.float32)


# --------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------


def _bf16_cases() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    cases = [torch.randn(shape, generator=gen).mul(3.0) for shape in ODD_SHAPES]
    special = torch.randn(6, 45, generator=gen)
    special[0] = 0.0
    special[1, 3] = float("inf")
    special[2, 0] = float("nan")
    special[3, 44] = float("-inf")
    special[4] *= 1e-40  # float32 subnormals
    special[5, :3] = torch.tensor([3.4e38, -3.4e38, 1.0 + 2**-8])  # beyond bfloat16's largest; a tie
    cases += [special, torch.tensor(2.5), torch.randn(40, 6, generator=gen).t()]
    return cases


def test_bf16_rounds_as_pytorch_converts():
    codec = get_codec("bf16")
    for x in _bf16_cases():
        (h,) = codec.compress_op(x)
        want = x.to(torch.bfloat16)
        assert _same_values(h, want) and h.is_contiguous(), x.shape
        # Bit for bit, NaN included, where the op and the reference agree.
        assert torch.equal(h.view(torch.int16), codec.reference_compress(x)[0].view(torch.int16))
        out = codec.decompress_op(h, list(x.shape), torch.float32)
        assert _same_values(out, want.float()) and out.is_contiguous()
    assert codec.compressed_nbytes((4, 5), torch.float32) == 40


def test_bf16_stochastic_rounding_picks_a_neighbour_without_bias():
    codec = get_codec("bf16")
    for x in _bf16_cases():
        (a,) = codec.compress_op(x, stochastic=True, seed=4)
        (b,) = codec.compress_op(x, stochastic=True, seed=4)
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        assert _same_values(a, codec.reference_compress(x, stochastic=True, seed=4)[0])
        finite = torch.isfinite(x)
        bits = x.contiguous().view(torch.int32).long()
        got = a.float().view(torch.int32).long()
        down = bits & ~0xFFFF
        assert ((got == down) | (got == down + 0x10000))[finite].all(), x.shape
        assert _same_values(a[~finite], x[~finite].to(torch.bfloat16))
    # 1 + 2**-10 lies a quarter of the way between two bfloat16 values.
    z = torch.full((1 << 16,), 1.0 + 2**-10)
    mean = codec.compress_op(z, stochastic=True, seed=1)[0].double().mean().item()
    assert abs(mean - (1.0 + 2**-10)) < 2e-5
    assert abs(codec.compress_op(z)[0].double().mean().item() - (1.0 + 2**-10)) > 9e-4  # nearest: biased


def test_bf16_opcheck():
    codec = get_codec("bf16")
    gen = torch.Generator().manual_seed(2)
    for x, stochastic, seed in [
        (torch.randn(3, 37, generator=gen), False, 0),
        (torch.randn(2, 40, 6, generator=gen).transpose(1, 2), True, 5),
        (torch.tensor(1.5), False, 0),
    ]:
        torch.library.opcheck(codec.compress_op, (x, stochastic, seed))
        payload = codec.compress_op(x, stochastic, seed)
        torch.library.opcheck(codec.decompress_op, (*payload, list(x.shape), torch.float32))


def test_bf16_error_does_not_depend_on_outliers():
    # Measured: 55.6 dB on N(0, 1) and 55.6 dB with 0.1% of the channels 100x
    # larger (a relative error per value, whatever its neighbours).
    codec = get_codec("bf16")
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    assert _sqnr_db(x, roundtrip(codec, x)) >= 55.0
    outliers, _ = _outlier_data()
    assert _sqnr_db(outliers, roundtrip(codec, outliers)) >= 55.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_bf16_takes_float32_only(dtype):
    codec = get_codec("bf16")
    assert not codec.supports((4, 8), dtype) and codec.supports((4, 8), torch.float32)
    with pytest.raises(ValueError, match="codec 'bf16': input dtype .* accepted dtypes: float32"):
        codec.compress_op(torch.zeros(4, 8, dtype=dtype))
    with pytest.raises(ValueError, match="codec 'bf16': output dtype"):
        codec.decompress_op(torch.zeros(4, 8, dtype=torch.bfloat16), [4, 8], dtype)
