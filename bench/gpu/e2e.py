#!/usr/bin/env python3
"""End-to-end Llama training steps on one GPU: adacc against Inductor, PyTorch's budget and checkpointing.

A Hugging Face ``LlamaForCausalLM`` of about 0.7 B parameters (width 2048,
12 layers, MLP 5632, 16 query / 8 KV heads, vocab 32000; random init, no
download) in bf16 at sequence 2048 runs a training step (zero grads, forward,
backward; the optimizer update is the same for every variant and left out)
under each variant, all side by side in one process as in ``adacc bench``:

  inductor    stock torch.compile, the baseline of the step-time ratios
  adacc<b>    torch.compile(backend=adacc, options={"memory_budget": b})
  pt<b>       Inductor with torch._functorch.config.activation_memory_budget=b
  ac          eager with every decoder layer checkpointed (non-reentrant)

Per variant: tokens/s (batch x seq / median step time), the step-time ratio to
stock Inductor (median of interleaved rounds), the peak memory of a step above
its start (``torch.cuda.max_memory_allocated``), the bytes one forward saves for
the backward (saved-tensor hooks) and the compile time. Results go to
``$OUT`` (else ``--out``) as ``e2e_gpu.md`` and ``e2e_gpu.csv``, rewritten
after every variant so a run cut short still leaves what it measured.

Expected invocation on the H200 (torch 2.11, triton 3.6 and transformers
installed, no network; highspy carried as a wheel in ``.whl/``), from the
repository root, with nothing of adacc installed: the script imports adacc
from this checkout::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/highspy-*.whl
    PYTHONPATH=/tmp/site python3 bench/gpu/e2e.py

(``--site DIR_OR_WHEEL`` instead of PYTHONPATH also works: a directory is put
on ``sys.path``, a wheel is unpacked into a temporary one.) It stops preparing
new variants once ``--time-limit`` seconds (default 360) are spent, so that the
whole run stays under 8 minutes (a variant begun before the limit still
finishes, then all are timed); the variants are prepared most important
first. ``--tiny`` runs the same code path on a tiny config (on the CPU when
there is no GPU) as a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Nothing may be fetched on the GPU machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("bench.gpu.e2e")

COLUMNS = [
    "variant", "budget", "tokens_per_s", "step_ratio", "step_ms", "peak_mib", "saved_mib",
    "budget_mib", "grad_err", "compile_s", "status", "error",
]  # fmt: skip


def _add_site(path: str) -> None:
    p = Path(path)
    if p.suffix == ".whl":
        # A wheel with a compiled extension cannot be imported from the zip.
        target = Path(tempfile.mkdtemp(prefix="adacc_site_"))
        with zipfile.ZipFile(p) as zf:
            zf.extractall(target)
        p = target
    if not p.is_dir():
        raise SystemExit(f"--site: {path} is neither a directory nor a .whl file")
    sys.path.insert(0, str(p))


def _import_adacc():
    """adacc from this checkout: as installed if it is, else straight from the source tree."""
    sys.path.insert(0, str(REPO))
    import adacc_compiler

    try:
        import adacc_compiler.passes  # noqa: F401
    except ImportError:
        # Installed, `passes/` and `triton_kernels/` become adacc_compiler.passes
        # and adacc_compiler.triton_kernels; from the source tree the package
        # must also look for its subpackages at the repository's root.
        adacc_compiler.__path__.append(str(REPO))
        import adacc_compiler.passes  # noqa: F401
    import highspy  # noqa: F401 - fail here, clearly, rather than at the first adacc compile

    return adacc_compiler


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny config: a smoke test of this script (CPU if no GPU)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.7, 0.35], help="adacc memory_budget values, most important first")
    p.add_argument("--pt-budgets", type=float, nargs="*", default=[0.5, 0.3], help="activation_memory_budget values")
    p.add_argument("--no-ac", action="store_true", help="leave out activation checkpointing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=360.0, help="seconds after which no further variant is prepared")
    p.add_argument("--profile", action="store_true", help="after timing, print each variant's CUDA kernel time by kind and its top kernels")
    p.add_argument("--site", action="append", default=[], help="directory or wheel to import packages (highspy) from")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: $OUT, else bench/results/gpu)")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.width, args.mlp, args.heads, args.kv_heads, args.vocab = 2, 64, 176, 4, 2, 256
        args.seq, args.batch = 64, 2
    for b in [*args.budgets, *args.pt_budgets]:
        if not 0.0 < b <= 1.0:
            raise SystemExit(f"budgets: each must be a fraction in (0, 1], got {b}")
    return args


def build_model(args, device):
    import torch
    from transformers import LlamaForCausalLM

    from adacc_compiler.models import llama_config

    cfg = llama_config(
        layers=args.layers,
        width=args.width,
        vocab=args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads,
        mlp=args.mlp,
        max_seq=args.seq,
        attn=args.attn,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    return model, {"input_ids": ids, "labels": ids}


def variants_in_order(args, bench):
    """Most important first: what a run cut short by the time limit should still have."""
    by_name = {v.name: v for v in bench.make_variants(args.budgets, args.pt_budgets)}
    names = ["inductor"]
    adacc = [f"adacc{b:g}" for b in args.budgets]
    pt = [f"pt{b:g}" for b in args.pt_budgets]
    names += adacc[:1] + pt[:1] + ([] if args.no_ac else ["ac"]) + adacc[1:] + pt[1:]
    return [by_name[n] for n in names]


def write_results(out: Path, rows: list[dict], header: str, *, gib: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "e2e_gpu.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})

    def fmt(x, spec):
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    unit, scale = ("GiB", 1 / 1024) if gib else ("MiB", 1.0)

    def mem(x):
        return fmt(None if x is None else x * scale, ".2f")

    lines = [
        header,
        "",
        f"| variant | tokens/s | step ratio | peak {unit} | saved {unit} | budget {unit} | grad err | compile s | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] + (f": {r['error'][:160]}" if r.get("error") else "")
        lines.append(
            f"| {r['variant']} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('step_ratio'), '.3f')} | "
            f"{mem(r.get('peak_mib'))} | {mem(r.get('saved_mib'))} | {mem(r.get('budget_mib'))} | "
            f"{fmt(r.get('grad_err'), '.2e')} | {fmt(r.get('compile_s'), '.0f')} | {status.replace('|', '/')} |"
        )
    (out / "e2e_gpu.md").write_text("\n".join(lines) + "\n")


_KINDS = (
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "cublas")),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("adacc codec", ("_compress", "_decompress", "int8_", "int4_", "bool1")),
    ("inductor", ("triton_",)),
)


def _kind(kernel: str) -> str:
    name = kernel.lower()
    for kind, keys in _KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def profile_steps(steps: dict, *, top: int = 12) -> str:
    """Each step's CUDA kernel time, by kind and the ``top`` kernels (one profiled step after one warm step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for name, step in steps.items():
        try:
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
            us = lambda e: getattr(e, "self_device_time_total", None) or e.self_cuda_time_total  # noqa: E731
            total = sum(us(e) for e in kernels)
            by_kind: dict[str, float] = {}
            for e in kernels:
                by_kind[_kind(e.key)] = by_kind.get(_kind(e.key), 0.0) + us(e)
            kinds = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
            lines.append(f"## {name}: {total / 1e3:.2f} ms of kernels in {sum(e.count for e in kernels)} launches ({kinds})")
            for e in sorted(kernels, key=us, reverse=True)[:top]:
                lines.append(f"   {us(e) / 1e3:8.3f} ms {e.count:5d}x  {e.key[:110]}")
        except Exception as exc:  # noqa: BLE001 - a diagnostic; report and go on
            lines.append(f"## {name}: profiling failed: {type(exc).__name__}: {exc}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # One line per compiled graph: budget, predicted peak, decisions, estimated overhead.
    logging.getLogger("adacc_compiler").setLevel(logging.INFO)
    t_start = time.perf_counter()
    for site in args.site:
        _add_site(site)
    adacc = _import_adacc()
    import highspy
    import torch

    print(f"adacc from {Path(adacc.__file__).parent}, passes from {Path(adacc.passes.__file__).parent}, "
          f"highspy from {Path(highspy.__file__).parent}", flush=True)

    from adacc_compiler import bench

    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        raise SystemExit("this script needs transformers") from None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("no GPU: run with --tiny for a CPU smoke test")
    out = args.out or Path(os.environ.get("OUT") or REPO / "bench" / "results" / "gpu")
    base, batch = build_model(args, device)
    n_params = sum(p.numel() for p in base.parameters())
    tokens = args.batch * args.seq
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (
        f"Llama {n_params / 1e9:.2f} B parameters ({args.layers} layers, width {args.width}, {args.attn} attention), "
        f"bf16, batch {args.batch} x seq {args.seq}, on {gpu}; torch {torch.__version__}. Step = zero grads, "
        f"forward, backward. Ratios to stock Inductor, median of {args.rounds} interleaved rounds; peak = "
        f"{'max_memory_allocated' if device == 'cuda' else 'profiler memory events'} during a step above its start; "
        f"saved = bytes one forward keeps for the backward; grad err = ||g - g_eager|| / ||g_eager|| over all "
        f"parameters against one eager step in the same dtype (stock Inductor's own error is the scale)."
    )
    print(header, flush=True)

    # Eager gradients in the same dtype: in bf16 every compiled variant differs
    # from them by rounding, so stock Inductor's own error is the yardstick and
    # a wrong rewrite shows as an error far above it.
    ref = copy.deepcopy(base)
    bench.make_step(ref, ref, batch)()
    if device == "cuda":
        torch.cuda.empty_cache()

    rows: list[dict] = []
    steps = {}
    with bench._compile_isolation():
        for v in variants_in_order(args, bench):
            row = {k: None for k in bench.COLUMNS}
            row.update(variant=v.name, budget=v.budget, status="failed", error="")
            elapsed = time.perf_counter() - t_start
            if elapsed > args.time_limit:
                row["error"] = f"skipped: {elapsed:.0f} s spent, over --time-limit {args.time_limit:.0f} s"
                row["status"] = "skipped"
            else:
                print(f"[{elapsed:6.0f}s] preparing {v.name} ...", flush=True)
                step = bench.prepare_variant(v, base, batch, ref, row, device=device)
                if step is not None:
                    steps[v.name] = step
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(
                {
                    "variant": v.name,
                    "budget": v.budget,
                    "peak_mib": row["peak_mib"],
                    "saved_mib": row["saved_mib"],
                    "budget_mib": row["budget_mib"],
                    "grad_err": row.get("grad_rel_err"),
                    "compile_s": row["compile_s"],
                    "status": row["status"],
                    "error": row["error"],
                }
            )
            print(f"         {v.name}: {rows[-1]['status']} {rows[-1]['error'][:300]}", flush=True)
            write_results(out, rows, header, gib=not args.tiny)

        if "inductor" in steps:
            print(f"[{time.perf_counter() - t_start:6.0f}s] timing {len(steps)} variants, {args.rounds} rounds ...", flush=True)
            timing = bench.measure.interleaved_step_ratios(steps, baseline="inductor", rounds=args.rounds, warmup=args.warmup)
            for r in rows:
                t = timing.get(r["variant"])
                if t is None:
                    continue
                if t["error"]:
                    r["status"], r["error"] = "failed", "timing: " + t["error"][:300]
                    continue
                r["step_ms"] = t["median_s"] * 1e3
                r["step_ratio"] = t["ratio"]
                r["tokens_per_s"] = tokens / t["median_s"]
            if args.profile and device == "cuda":
                print(profile_steps(steps), flush=True)
        else:
            print("stock Inductor failed: no step ratios", flush=True)
    write_results(out, rows, header, gib=not args.tiny)
    print((out / "e2e_gpu.md").read_text())
    print(f"wrote {out / 'e2e_gpu.md'} and {out / 'e2e_gpu.csv'} in {time.perf_counter() - t_start:.0f} s")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
