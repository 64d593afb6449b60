"""Codec throughput against the device's copy bandwidth.

    python bench/bench_codecs.py --sizes 1M 4M 16M --dtype float32 --out bench/results/

For each codec and size, times ``compress`` and ``decompress`` through the
registered ops (the Triton kernels on CUDA, the torch path on CPU) and a plain
``y.copy_(x)`` of the same tensor. Throughput counts the bytes each one moves:
input + payloads for compress, payloads + output for decompress, input + output
for the copy; ``*_of_copy`` is the codec's GB/s over the copy's. Inputs are
Gaussian ``(size / channels, channels)`` tensors (``bool1``: random masks of the
same element count). The three are timed in ``--repeats`` interleaved rounds
after ``--warmup`` calls each; times are medians over rounds, ``*_of_copy`` the
median of the in-round ratios, so a shared machine's drift does not land on
one of them.

On CUDA a round queues :data:`CUDA_CALLS` calls of each function behind a GPU
sleep long enough for the host to get ahead, each call after an L2 flush and
between its own events: the device time of the call's kernels, not the
Python that launches them, which in a compiled training step overlaps the GPU
work of earlier ops. That host time is reported on its own
(``*_host_us``: wall time to issue one call). Timed one call at a time with
a synchronisation after each, the launch cost counted as if the GPU waited
for it (tens of microseconds, a third of a 64M-element kernel). ``OMP_WAIT_POLICY`` is
set to ``PASSIVE`` unless already set: spinning OpenMP threads of other
processes made CPU times swing by 10x on a small shared host.

Writes ``DIR/codecs_<tag>.csv`` and ``DIR/codecs_<tag>.json`` (rows plus a
machine description); ``<tag>`` defaults to the device type.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = [
    "codec", "path", "device", "dtype", "numel", "shape", "ratio",
    "compress_ms", "compress_gbps", "compress_of_copy",
    "decompress_ms", "decompress_gbps", "decompress_of_copy",
    "copy_gbps", "compress_host_us", "decompress_host_us",
]

# Calls per function and round on CUDA, queued behind one GPU sleep.
CUDA_CALLS = 10
# Zeroed before each timed CUDA call so no call reads its input from the L2
# cache the previous one filled (H200: 60 MiB of L2).
_L2_FLUSH_BYTES = 256 * 2**20
# GPU cycles the queue starts with: 10 ms at 2 GHz, longer than the host
# takes to queue CUDA_CALLS calls of any codec op.
_SLEEP_CYCLES = 20_000_000


def import_codecs():
    """``adacc_compiler.triton_kernels``, installed or straight from this checkout.

    Without an install (the GPU machine), the package is mapped onto the
    checkout without running ``adacc_compiler/__init__.py``, which needs the
    planner's dependencies; the codecs need only torch and triton.
    """
    # find_spec raises on a package mapped here earlier in the same process.
    if "adacc_compiler" not in sys.modules and importlib.util.find_spec("adacc_compiler") is None:
        pkg = types.ModuleType("adacc_compiler")
        pkg.__path__ = [str(REPO / "adacc_compiler"), str(REPO)]
        sys.modules["adacc_compiler"] = pkg
    import adacc_compiler.triton_kernels as codecs

    return codecs


def parse_size(text: str) -> int:
    """``16M`` -> 16 * 2**20 (K, M, G are powers of two)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _timer(device: torch.device):
    """A function that times ``fn``: (device seconds per call, host seconds per call)."""
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)

        def timed(fn):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(CUDA_CALLS)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(CUDA_CALLS)]
            host = []
            torch.cuda.synchronize(device)
            torch.cuda._sleep(_SLEEP_CYCLES)
            for start, end in zip(starts, ends):
                flush.zero_()
                start.record()
                t0 = time.perf_counter()
                fn()
                host.append(time.perf_counter() - t0)
                end.record()
            torch.cuda.synchronize(device)
            device_s = statistics.median(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
            return device_s, statistics.median(host)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            return wall, wall
    return timed


def time_rounds(
    fns: dict, device: torch.device, rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of each function, one timing of each per round: (device, host).

    Interleaving keeps a drift of the machine (other work on a shared host,
    clocks) from landing on one function only; ratios are taken within a round.
    """
    timed = _timer(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    host: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            device_s, host_s = timed(fn)
            times[name].append(device_s)
            host[name].append(host_s)
    return times, host


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_codec(codec, numel: int, channels: int, dtype: torch.dtype, device: torch.device,
                repeats: int, warmup: int, *, fused: bool = False) -> dict:
    """One codec at one size. ``fused`` times the codec's PyTorch definition
    compiled by Inductor (what adacc inlines on the CPU) instead of its ops."""
    gen = torch.Generator(device=device).manual_seed(0)
    if codec.lossless:
        x = torch.rand(numel, generator=gen, device=device) > 0.5
    else:
        x = torch.randn(numel // channels, channels, generator=gen, device=device).to(dtype)
    shape, out_dtype = list(x.shape), x.dtype
    if fused:
        # Fresh compiles: the lambdas below are one code object for every
        # codec and size, and Dynamo's recompile limit would run later ones eagerly.
        torch._dynamo.reset()
        compress = torch.compile(lambda v: tuple(codec.reference_compress(v)), dynamic=False)
        decompress = torch.compile(lambda *p: codec.reference_decompress(*p, shape, out_dtype), dynamic=False)
    else:
        compress = codec.compress_op
        decompress = lambda *p: codec.decompress_op(*p, shape, out_dtype)  # noqa: E731
    payload = compress(x)
    y = decompress(*payload)
    assert y.shape == x.shape
    in_bytes, payload_bytes = _nbytes([x]), _nbytes(payload)
    assert payload_bytes == codec.compressed_nbytes(shape, out_dtype)
    times, host = time_rounds(
        {
            "copy": lambda: y.copy_(x),
            "compress": lambda: compress(x),
            "decompress": lambda: decompress(*payload),
        },
        device, repeats, warmup,
    )
    t_copy, t_comp, t_dec = (statistics.median(times[k]) for k in ("copy", "compress", "decompress"))
    copy_gbps = 2 * in_bytes / t_copy / 1e9
    comp_gbps = (in_bytes + payload_bytes) / t_comp / 1e9
    dec_gbps = (payload_bytes + in_bytes) / t_dec / 1e9
    # fraction of the copy's bandwidth: median over rounds of the in-round ratio
    comp_of_copy = statistics.median(
        (in_bytes + payload_bytes) / c / (2 * in_bytes / k) for c, k in zip(times["compress"], times["copy"])
    )
    dec_of_copy = statistics.median(
        (payload_bytes + in_bytes) / d / (2 * in_bytes / k) for d, k in zip(times["decompress"], times["copy"])
    )
    return {
        "codec": codec.name,
        "path": "fused" if fused else "op",
        "device": device.type,
        "dtype": str(out_dtype).removeprefix("torch."),
        "numel": x.numel(),
        "shape": "x".join(map(str, shape)),
        "ratio": round(in_bytes / payload_bytes, 3),
        "compress_ms": round(t_comp * 1e3, 4),
        "compress_gbps": round(comp_gbps, 2),
        "compress_of_copy": round(comp_of_copy, 3),
        "decompress_ms": round(t_dec * 1e3, 4),
        "decompress_gbps": round(dec_gbps, 2),
        "decompress_of_copy": round(dec_of_copy, 3),
        "copy_gbps": round(copy_gbps, 2),
        "compress_host_us": round(statistics.median(host["compress"]) * 1e6, 1),
        "decompress_host_us": round(statistics.median(host["decompress"]) * 1e6, 1),
    }


def machine(device: torch.device) -> dict:
    import triton

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torch_threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def run(sizes, channels: int, dtype: torch.dtype, names, device: torch.device, repeats: int, warmup: int,
        log=print) -> list[dict]:
    codecs = import_codecs()
    fusible = set()
    if device.type == "cpu":
        from adacc_compiler.passes.compress import FUSIBLE_CODECS, fusible_on

        fusible = {n for n in FUSIBLE_CODECS if fusible_on(device, stochastic=False, codec=n, shape=(channels,))}
    rows = []
    for numel in sizes:
        for name in names:
            # On the CPU, adacc inlines the fusible codecs for Inductor to compile.
            paths = [False, True] if device.type == "cpu" and name in fusible else [False]
            codec = codecs.get_codec(name)
            # A codec for one input dtype (bf16 takes float32) is timed on it.
            codec_dtype = dtype if codec.lossless or codec.supports((channels,), dtype) else torch.float32
            for fused in paths:
                row = bench_codec(codec, numel, channels, codec_dtype, device, repeats, warmup, fused=fused)
                log(", ".join(f"{k}={row[k]}" for k in COLUMNS))
                rows.append(row)
    return rows


def write(rows: list[dict], meta: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"codecs_{tag}.csv", out_dir / f"codecs_{tag}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(json_path, "w") as f:
        json.dump({"machine": meta, "rows": rows}, f, indent=2)
    return csv_path, json_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "4M", "16M"], help="elements, e.g. 1M 16M")
    parser.add_argument("--channels", type=int, default=1024, help="last dimension (default 1024)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--codecs", nargs="+", default=None, help="default: every registered codec")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--tag", default=None, help="file name suffix (default: the device type)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sizes = [parse_size(s) for s in args.sizes]
    if any(n < args.channels for n in sizes):
        parser.error(f"--sizes must be at least --channels ({args.channels})")
    names = args.codecs or sorted(import_codecs().CODECS)
    started = time.perf_counter()
    rows = run(sizes, args.channels, DTYPES[args.dtype], names, device, args.repeats, args.warmup)
    meta = machine(device) | {"args": vars(args), "elapsed_s": round(time.perf_counter() - started, 1)}
    paths = write(rows, meta, Path(args.out), args.tag or device.type)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
