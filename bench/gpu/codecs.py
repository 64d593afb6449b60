"""Check every codec's CUDA kernels against the references, then time them (one GPU).

    python3 bench/gpu/codecs.py                 # results into $OUT, else bench/results/gpu/
    python3 bench/gpu/codecs.py --sizes 16M     # a shorter run

Written for an H200 with torch 2.11 and triton 3.6, no network, the checkout
not installed (``bench_codecs.import_codecs`` maps the package onto it). About
two minutes of GPU time (guessed, not measured), most of it Triton
compiling the kernels for each checked shape.

1. Correctness, mostly on bfloat16: for each lossy codec, the payloads of the
   registered op on CUDA (the Triton kernels) are compared bit for bit with the
   plain-PyTorch reference run on the same GPU and on the CPU (round to
   nearest, odd shapes, rows wider than one block, NaN / inf / all-zero rows,
   float16 and float32 on a few); decompress is bit-exact for bfloat16 and
   float32 outputs and the input's dtype (on the GPU the float32 -> bfloat16
   cast rounds to nearest even, unlike the interpreter's); stochastic rounding
   is deterministic for a seed, within one step, and unbiased on average over
   64 seeds; ``bf16`` matches PyTorch's float32 -> bfloat16 conversion bit
   for bit and rounds stochastically to a neighbour without bias; ``bool1``
   round-trips bit for bit; ``torch.library.opcheck``
   passes on CUDA inputs.
2. Throughput at 16M, 64M and 256M bfloat16 elements (4096 channels; ``bool1``
   on masks of the same element count, ``bf16`` on float32, the only dtype it
   takes): compress and decompress GB/s and their
   fraction of the copy bandwidth measured on the same tensor (see
   ``bench/bench_codecs.py``).

Writes ``codecs_gpu_check.txt`` (one line per check), ``codecs_gpu.md`` (the
table), ``codecs_gpu.csv`` and ``codecs_gpu.json``. Exit code 1 if any check
failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import bench_codecs  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import torch  # noqa: E402

CHECK_SHAPES = [(1, 1), (3, 37), (2, 5, 96), (7, 200), (64, 4096), (333, 1000), (4, 20000)]
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _same(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Bit-identical values (NaN matching NaN), with a short reason when not."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point():
        nan_ok = torch.equal(a.isnan(), b.isnan())
        a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
        if nan_ok and torch.equal(a, b):
            return True, ""
        diff = (a.double() - b.double()).abs()
        return False, f"{int((diff > 0).sum())} of {a.numel()} differ (max {diff.max().item():.3g}), NaN match {nan_ok}"
    if torch.equal(a, b):
        return True, ""
    diff = (a.long() - b.long()).abs()
    return False, f"{int((diff > 0).sum())} of {a.numel()} differ (max {diff.max().item()})"


def _special(channels: int, device) -> torch.Tensor:
    x = torch.randn(6, channels, device=device)
    x[0] = 0.0
    x[1, channels // 2] = float("inf")
    x[2, 0] = float("nan")
    x[3, channels - 1] = float("-inf")
    x[4] *= 1e-35
    return x


class Checks:
    def __init__(self):
        self.lines: list[str] = []
        self.failed = 0

    def add(self, ok: bool, what: str, detail: str = "") -> None:
        self.failed += not ok
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
        if not ok:
            print(self.lines[-1], flush=True)

    def payloads(self, got, want, what: str) -> None:
        if len(got) != len(want):
            self.add(False, what, f"{len(got)} payloads vs {len(want)}")
            return
        reasons = [r for g, w in zip(got, want) for ok, r in [_same(g, w)] if not ok]
        self.add(not reasons, what, "; ".join(reasons))


def check_lossy(checks: Checks, codec, qmax: int, device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    # bfloat16 everywhere, the other dtypes on one odd shape: each distinct
    # shape, dtype and rounding mode is one more Triton compile (most of the time).
    cases = [torch.randn(shape, generator=gen, device=device).mul(3.0).to(torch.bfloat16) for shape in CHECK_SHAPES]
    cases += [torch.randn(3, 37, generator=gen, device=device).to(dtype) for dtype in (torch.float16, torch.float32)]
    cases += [_special(45, device).to(dtype) for dtype in FLOATS]
    cases.append(torch.randn(40, 6, generator=gen, device=device).to(torch.bfloat16).t())  # non-contiguous
    for x in cases:
        where = f"{codec.name} {x.dtype} {list(x.shape)}"
        got = codec.compress_op(x)
        want = codec.reference_compress(x)
        checks.payloads(got, want, f"{where} compress == reference on GPU")
        checks.payloads(got, codec.reference_compress(x.cpu()), f"{where} compress == reference on CPU")
        for out_dtype in {torch.bfloat16, torch.float32, x.dtype}:
            dec = codec.decompress_op(*got, list(x.shape), out_dtype)
            ok, why = _same(dec, codec.reference_decompress(*want, list(x.shape), out_dtype))
            checks.add(ok and dec.is_contiguous(), f"{where} decompress -> {out_dtype}", why)
        xf = x.float()
        bad = ~torch.isfinite(xf)
        dec = codec.decompress_op(*got, list(x.shape), torch.float32)
        checks.add(not torch.isfinite(dec[bad]).any().item(), f"{where} non-finite inputs decode non-finite")
        first = codec.compress_op(x, True, 7)
        checks.payloads(first, codec.compress_op(x, True, 7), f"{where} stochastic deterministic for a seed")
        dec = codec.decompress_op(*first, list(x.shape), torch.float32)
        rows_ok = torch.isfinite(xf).all(dim=-1, keepdim=True)
        mag = xf.nan_to_num(0.0, 0.0, 0.0).abs()
        step = mag.amax(dim=-1, keepdim=True).clamp_min(2.0**-100) / qmax
        err = torch.where(rows_ok, (dec - xf).abs(), 0.0)
        # plus the float32 rounding of the decoded value (matters at int12's steps)
        checks.add(bool((err <= step * 1.0001 + mag * 2.0**-22).all()), f"{where} stochastic within one step")
    x = torch.randn(64, 4096, generator=gen, device=device).to(torch.bfloat16)
    xf = x.float()
    draws = torch.stack([
        codec.decompress_op(*codec.compress_op(x, True, seed), list(x.shape), torch.float32) for seed in range(64)
    ])
    rtn = (codec.decompress_op(*codec.compress_op(x), list(x.shape), torch.float32) - xf).abs().mean().item()
    bias = (draws.mean(dim=0) - xf).abs().mean().item()
    # unbiased: 64 draws leave about 0.8 * 0.41 / 8 = 0.04 step of spread vs 0.25 for nearest
    checks.add(bias < 0.35 * rtn, f"{codec.name} stochastic unbiased", f"mean |bias| {bias:.3g} vs nearest {rtn:.3g}")
    small = torch.randn(3, 37, device=device).to(torch.bfloat16)
    try:
        torch.library.opcheck(codec.compress_op, (small, False, 0))
        torch.library.opcheck(codec.decompress_op, (*codec.compress_op(small), [3, 37], torch.bfloat16))
        checks.add(True, f"{codec.name} opcheck on CUDA")
    except Exception as exc:  # report and go on to the other codecs
        checks.add(False, f"{codec.name} opcheck on CUDA", repr(exc)[:300])


def check_bool1(checks: Checks, codec, device) -> None:
    gen = torch.Generator(device=device).manual_seed(1)
    patterns = ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).bool()
    cases = [torch.rand(s, generator=gen, device=device) > 0.5 for s in [(), (1,), (9,), *CHECK_SHAPES]]
    cases += [patterns.reshape(-1), (torch.rand(40, 6, generator=gen, device=device) > 0.5).t()]
    for x in cases:
        where = f"bool1 {list(x.shape)}"
        got = codec.compress_op(x)
        checks.payloads(got, codec.reference_compress(x), f"{where} compress == reference on GPU")
        checks.payloads(got, codec.reference_compress(x.cpu()), f"{where} compress == reference on CPU")
        ok, why = _same(codec.decompress_op(*got, list(x.shape), torch.bool), x)
        checks.add(ok, f"{where} round trip", why)
    try:
        torch.library.opcheck(codec.compress_op, (cases[4], False, 0))
        torch.library.opcheck(codec.decompress_op, (*codec.compress_op(cases[4]), list(cases[4].shape), torch.bool))
        checks.add(True, "bool1 opcheck on CUDA")
    except Exception as exc:
        checks.add(False, "bool1 opcheck on CUDA", repr(exc)[:300])


def check_bf16(checks: Checks, codec, device) -> None:
    """float32 -> bfloat16 as PyTorch converts on the GPU, and stochastic rounding to a neighbour."""
    gen = torch.Generator(device=device).manual_seed(3)
    cases = [torch.randn(shape, generator=gen, device=device).mul(3.0) for shape in CHECK_SHAPES]
    special = _special(45, device)
    special[5, :3] = torch.tensor([3.4e38, -3.4e38, 1.0 + 2**-8], device=device)
    cases += [special, torch.randn(40, 6, generator=gen, device=device).t()]
    for x in cases:
        where = f"bf16 {list(x.shape)}"
        got = codec.compress_op(x)
        checks.payloads(got, [x.to(torch.bfloat16).contiguous()], f"{where} compress == PyTorch's conversion")
        checks.payloads(got, codec.reference_compress(x.cpu()), f"{where} compress == reference on CPU")
        dec = codec.decompress_op(*got, list(x.shape), torch.float32)
        ok, why = _same(dec, got[0].float())
        checks.add(ok and dec.is_contiguous(), f"{where} decompress", why)
        first = codec.compress_op(x, True, 7)
        checks.payloads(first, codec.compress_op(x, True, 7), f"{where} stochastic deterministic for a seed")
        finite = torch.isfinite(x)
        down = x.contiguous().view(torch.int32).long() & ~0xFFFF
        bits = first[0].float().view(torch.int32).long()
        neighbour = ((bits == down) | (bits == down + 0x10000))[finite].all().item()
        checks.add(bool(neighbour), f"{where} stochastic rounds to a neighbouring bfloat16")
    z = torch.full((1 << 20,), 1.0 + 2**-10, device=device)
    mean = codec.compress_op(z, True, 1)[0].double().mean().item()
    checks.add(abs(mean - (1.0 + 2**-10)) < 1e-5, "bf16 stochastic unbiased", f"mean {mean:.7f} vs {1 + 2**-10:.7f}")
    small = torch.randn(3, 37, device=device)
    try:
        torch.library.opcheck(codec.compress_op, (small, False, 0))
        torch.library.opcheck(codec.decompress_op, (*codec.compress_op(small), [3, 37], torch.float32))
        checks.add(True, "bf16 opcheck on CUDA")
    except Exception as exc:
        checks.add(False, "bf16 opcheck on CUDA", repr(exc)[:300])


def int8_group_parts(numel: int, channels: int, device) -> list[str]:
    """Where ``int8_group`` compress spends its time: the whole op, its channel abs-max pass and
    its outlier selection, next to a copy (median of ``do_bench``, after the tuned op ran)."""
    from triton.testing import do_bench

    from adacc_compiler.triton_kernels import int8_group as g

    x = torch.randn(numel // channels, channels, device=device).to(torch.bfloat16)
    g.compress_op(x)  # tunes
    amax = g._channel_absmax(x)
    k = g.num_outliers(channels)
    parts = {
        "whole op": lambda: g.compress_op(x),
        "channel abs-max": lambda: g._channel_absmax(x),
        "select outliers + slot map": lambda: g._slot_map(g.select_outliers(amax, k), channels),
        "copy": lambda: x.clone(),
    }
    times = {name: do_bench(fn, return_mode="median") for name, fn in parts.items()}
    return [f"- {name}: {ms * 1e3:.1f} us" for name, ms in times.items()]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Codec throughput on {meta.get('gpu', 'GPU')}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta.get('git_commit')}, {meta['date']}. "
        "GB/s counts input + payload bytes (compress) or payload + output bytes (decompress); "
        "`of copy` is that over `y.copy_(x)` on the same tensor, median of in-round ratios. "
        "Device time of calls queued behind a GPU sleep, L2 flushed before each (`bench/bench_codecs.py`); "
        "`host us` is the wall time to issue one call.",
        "",
        "| codec | dtype | elements | ratio | compress GB/s | of copy | decompress GB/s | of copy | copy GB/s "
        "| compress host us | decompress host us |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['dtype']} | {r['numel'] / 2**20:.0f}M | {r['ratio']} | {r['compress_gbps']} | "
            f"{r['compress_of_copy']:.2f} | {r['decompress_gbps']} | {r['decompress_of_copy']:.2f} | {r['copy_gbps']} "
            f"| {r['compress_host_us']} | {r['decompress_host_us']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["16M", "64M", "256M"])
    parser.add_argument("--channels", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(bench_codecs.REPO / "bench" / "results" / "gpu"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks and times the CUDA kernels", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codecs = bench_codecs.import_codecs()
    started = time.perf_counter()

    checks = Checks()
    if not args.skip_checks:
        from adacc_compiler.triton_kernels import int4_group, int8_group, int8_token, int12_token

        for mod in (int12_token, int8_token, int8_group, int4_group):
            try:
                check_lossy(checks, codecs.get_codec(mod.NAME), mod.QMAX, device)
            except Exception:
                checks.add(False, f"{mod.NAME} checks raised", traceback.format_exc()[-1500:])
        try:
            check_bool1(checks, codecs.get_codec("bool1"), device)
        except Exception:
            checks.add(False, "bool1 checks raised", traceback.format_exc()[-1500:])
        try:
            check_bf16(checks, codecs.get_codec("bf16"), device)
        except Exception:
            checks.add(False, "bf16 checks raised", traceback.format_exc()[-1500:])
        summary = f"{len(checks.lines) - checks.failed} passed, {checks.failed} failed"
        (out / "codecs_gpu_check.txt").write_text("\n".join(checks.lines + [summary]) + "\n")
        print(f"checks: {summary} ({time.perf_counter() - started:.0f} s)", flush=True)

    sizes = [bench_codecs.parse_size(s) for s in args.sizes]
    names = sorted(codecs.CODECS)
    rows = bench_codecs.run(sizes, args.channels, torch.bfloat16, names, device, args.repeats, warmup=3)
    meta = bench_codecs.machine(device) | {"args": vars(args), "elapsed_s": round(time.perf_counter() - started, 1)}
    from adacc_compiler.triton_kernels import _common as cm

    meta["tuned_configs"] = cm.tuned_configs()
    text = markdown(rows, meta) + "\nLaunch configurations picked by timing (kernel, key, size class, device):\n\n"
    text += "\n".join(f"- {k}: {v}" for k, v in meta["tuned_configs"].items()) + "\n"
    try:
        parts = int8_group_parts(bench_codecs.parse_size("64M"), args.channels, device)
        text += "\n`int8_group` compress at 64M elements, by part:\n\n" + "\n".join(parts) + "\n"
    except Exception:  # a diagnostic: report and go on
        text += "\n`int8_group` parts failed: " + traceback.format_exc()[-600:] + "\n"
    bench_codecs.write(rows, meta, out, "gpu")
    (out / "codecs_gpu.md").write_text(text)
    print(text)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
