#!/usr/bin/env python
"""End-to-end comparison of activation-memory strategies on a small HF model.

All variants live side by side in ONE process, each on its own deep copy of
the same initial weights, trained on the same batch:

  eager        plain eager fp32
  ac           eager + HF activation checkpointing (use_reentrant=False)
  inductor     stock torch.compile(backend="inductor")  -- the baseline
  pt<b>        Inductor with torch._functorch.config.activation_memory_budget=b
  adacc<b>     torch.compile(backend="adacc", options={"memory_budget": b})

Per variant: saved-activation MiB (saved-tensor pack hooks, parameters,
buffers and inputs excluded), peak MiB of a full fwd+bwd step, step-time ratio
to stock Inductor (median over interleaved rounds), gradient relative error
against eager fp32, and compile time (wall time of the first step).

A variant that fails to build, compile or run is reported with status
"failed" and its error; the others go on.

    python bench/bench_e2e.py --model llama --layers 4 --budgets 0.5 0.3 \
        --pt-budgets 0.7 0.5 0.3 0.1 --rounds 10 --out bench/results/

See bench/README.md for what each column means and how it is measured.
"""

from __future__ import annotations

import os

# On a small shared CPU box, OpenMP threads that spin-wait between parallel
# regions (the default) starve each other and any other process: we saw the
# same eager step go from 0.1 s to 2 s.  Sleeping waits make timings sane.
# Must be set before torch (and its OpenMP runtime) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import csv
import datetime
import importlib.util
import json
import logging
import math
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import MODELS, make_model  # noqa: E402

log = logging.getLogger("bench_e2e")
MiB = float(1 << 20)


def _load_measure():
    """adacc_compiler.measure, even if the package's __init__ cannot import yet."""
    try:
        from adacc_compiler import measure

        return measure
    except Exception as e:  # noqa: BLE001
        log.warning("import adacc_compiler.measure failed (%s); loading by path", e)
        path = REPO / "adacc_compiler" / "measure.py"
        spec = importlib.util.spec_from_file_location("_adacc_measure", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


measure = _load_measure()

# --------------------------------------------------------------------------
# Compile-cache hygiene.
#
# All variants are compiled in one process and must keep their own partition.
# * The on-disk FX graph cache and AOTAutograd cache would (a) make compile_s
#   measure a cache hit from an earlier run rather than a compile, and (b) hand
#   one variant an artefact compiled for another if anything that matters
#   (here: activation_memory_budget, or adacc's options) were not part of the
#   cache key.  We switch both off.
# * Dynamo keeps compiled frames per *code object* (LlamaForCausalLM.forward
#   is shared by every copy of the model) and reuses an entry whose guards pass
#   and whose backend compares equal.  Two `backend="inductor"` wrappers with
#   the same options compare equal, so a second Inductor variant would silently
#   reuse the first one's graph, budget and all.  We therefore give each pt<b>
#   variant its own backend callable (which also patches the budget around the
#   compile itself), raise the recompile limit so 10+ variants fit, make
#   hitting it an error instead of a silent fall-back to eager, and check that
#   every compiled variant really produced a new graph.
# torch._dynamo.reset() between variants is not an option: every variant must
# stay compiled for the interleaved timing rounds.
# --------------------------------------------------------------------------
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 1024
torch._dynamo.config.fail_on_recompile_limit_hit = True


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------

FAMILIES = ("eager", "ac", "inductor", "pt", "adacc")


@dataclass
class Variant:
    name: str
    family: str
    budget: float | None
    # Takes a fresh model copy, returns the callable used as fwd(**batch).
    build: Callable[[nn.Module], Callable]
    compiled: bool
    # Context manager factory wrapped around the first (compiling) step.
    compile_ctx: Callable[[], object] | None = None


def _build_eager(m: nn.Module) -> Callable:
    return m


def _build_ac(m: nn.Module) -> Callable:
    kwargs = {"use_reentrant": False}
    if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 name
        m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # deprecated in 5.x, the only name in 4.x
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return m


def _build_inductor(m: nn.Module) -> Callable:
    return torch.compile(m, backend="inductor")


def _pt_backend(budget: float) -> Callable:
    """A distinct backend callable per budget: Inductor with the budget patched in."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)

    backend.__name__ = f"inductor_budget_{budget}"
    return backend


def _build_pt(budget: float) -> Callable[[nn.Module], Callable]:
    def build(m: nn.Module) -> Callable:
        return torch.compile(m, backend=_pt_backend(budget))

    return build


def _adacc_backend_ref():
    """'adacc' if registered with Dynamo after importing the backend, else the callable."""
    import adacc_compiler.backend as be  # noqa: F401 - may register "adacc"
    from torch._dynamo.backends.registry import list_backends

    if "adacc" in list_backends(exclude_tags=()):
        return "adacc"
    fn = getattr(be, "adacc_backend", None)
    if fn is None:
        raise RuntimeError("adacc backend not registered and adacc_backend not found")
    return fn


def _build_adacc(budget: float) -> Callable[[nn.Module], Callable]:
    def build(m: nn.Module) -> Callable:
        return torch.compile(m, backend=_adacc_backend_ref(), options={"memory_budget": budget})

    return build


def make_variants(budgets: list[float], pt_budgets: list[float]) -> list[Variant]:
    vs = [
        Variant("eager", "eager", None, _build_eager, compiled=False),
        Variant("ac", "ac", None, _build_ac, compiled=False),
        Variant("inductor", "inductor", None, _build_inductor, compiled=True),
    ]
    for b in pt_budgets:
        vs.append(
            Variant(
                f"pt{b:g}",
                "pt",
                b,
                _build_pt(b),
                compiled=True,
                compile_ctx=lambda b=b: torch._functorch.config.patch(
                    activation_memory_budget=b
                ),
            )
        )
    for b in budgets:
        vs.append(Variant(f"adacc{b:g}", "adacc", b, _build_adacc(b), compiled=True))
    return vs


def select_variants(vs: list[Variant], spec: str | None) -> list[Variant]:
    """Keep variants whose name or family is in the comma-separated ``spec``."""
    if not spec:
        return vs
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    known = {v.name for v in vs} | set(FAMILIES)
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {sorted(known)}")
    return [v for v in vs if v.name in wanted or v.family in wanted]


# --------------------------------------------------------------------------
# Measurement of one variant
# --------------------------------------------------------------------------


def _graph_count() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _make_step(model: nn.Module, fwd: Callable, batch: dict) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        fwd(**batch).loss.backward()

    return step


def _error_text(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    msg = " ".join(msg.split())
    return msg[:500]


def prepare_variant(
    v: Variant, base: nn.Module, batch: dict, ref: nn.Module, row: dict
) -> Callable[[], None] | None:
    """Build, compile and measure ``v`` (everything but timing). Fills ``row``."""
    try:
        model = copy.deepcopy(base)
        fwd = v.build(model)
        step = _make_step(model, fwd, batch)

        g0 = _graph_count()
        ctx = v.compile_ctx() if v.compile_ctx is not None else None
        t0 = time.perf_counter()
        if ctx is not None:
            with ctx:
                step()
        else:
            step()
        row["compile_s"] = time.perf_counter() - t0
        graphs = _graph_count() - g0
        row["graphs"] = graphs
        if v.compiled and graphs == 0:
            raise RuntimeError(
                "no new graph was compiled for this variant (a cached graph of "
                "another variant was reused?)"
            )

        row["grad_rel_err"] = measure.grad_relative_error(ref, model)

        exclude = [*model.parameters(), *model.buffers(), *batch.values()]
        row["saved_mib"] = (
            measure.saved_activation_bytes(lambda: fwd(**batch).loss, exclude=exclude) / MiB
        )
        row["peak_mib"] = measure.peak_memory_bytes(step, device="cpu") / MiB
        row["status"] = "ok"
        return step
    except Exception as e:  # noqa: BLE001 - report and go on
        row["status"] = "failed"
        row["error"] = _error_text(e)
        log.info("variant %s failed:\n%s", v.name, traceback.format_exc())
        return None


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

COLUMNS = [
    "model",
    "layers",
    "variant",
    "budget",
    "saved_mib",
    "saved_frac",
    "peak_mib",
    "step_ratio",
    "step_ms",
    "grad_rel_err",
    "compile_s",
    "graphs",
    "status",
    "error",
]


def machine_description() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:  # noqa: BLE001
        tf_version = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model or platform.processor() or None,
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": tf_version,
        "python_version": platform.python_version(),
        "cuda": torch.cuda.is_available(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'variant':<12} {'budget':>6} {'saved MiB':>10} {'saved/ind':>9} "
        f"{'peak MiB':>9} {'ratio':>6} {'step ms':>8} {'grad err':>9} "
        f"{'compile s':>9}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<12} {_fmt(r['budget'], '>6g'):>6} "
            f"{_fmt(r['saved_mib'], '>10.2f'):>10} {_fmt(r['saved_frac'], '>9.3f'):>9} "
            f"{_fmt(r['peak_mib'], '>9.2f'):>9} {_fmt(r['step_ratio'], '>6.2f'):>6} "
            f"{_fmt(r['step_ms'], '>8.1f'):>8} {_fmt(r['grad_rel_err'], '>9.1e'):>9} "
            f"{_fmt(r['compile_s'], '>9.1f'):>9}  {r['status']}"
            + (f": {r['error'][:120]}" if r["error"] else "")
        )
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_outputs(out: Path, stem: str, rows: list[dict], meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    json_path = out / f"{stem}.json"
    json_path.write_text(
        json.dumps([{k: _json_safe(r[k]) for k in COLUMNS} for r in rows], indent=2) + "\n"
    )
    machine_path = out / f"{stem}_machine.json"
    machine_path.write_text(json.dumps(meta, indent=2) + "\n")
    return [csv_path, json_path, machine_path]


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="batch size (models.py default)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (models.py default)")
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.3],
                   help="adacc memory_budget values")
    p.add_argument("--pt-budgets", type=float, nargs="*", default=[0.7, 0.5, 0.3, 0.1],
                   help="torch._functorch.config.activation_memory_budget values")
    p.add_argument("--variants", default=None,
                   help="comma-separated names or families to run, e.g. eager,ac,inductor,pt "
                        "or inductor,adacc0.5 (default: all)")
    p.add_argument("--baseline", default="inductor", help="variant the step ratios are relative to")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    kw = {"seed": args.seed}
    if args.batch is not None:
        kw["batch"] = args.batch
    if args.seq is not None:
        kw["seq"] = args.seq
    base, batch = make_model(args.model, args.layers, **kw)
    base = base.float().train()

    # Reference gradients: eager fp32, same weights, same batch, one step.
    ref = copy.deepcopy(base)
    _make_step(ref, ref, batch)()

    variants = select_variants(make_variants(args.budgets, args.pt_budgets), args.variants)
    rows: list[dict] = []
    steps: dict[str, Callable[[], None]] = {}
    for v in variants:
        row = {k: None for k in COLUMNS}
        row.update(model=args.model, layers=args.layers, variant=v.name, budget=v.budget,
                   status="failed", error="")
        print(f"[{time.perf_counter() - t_start:7.1f}s] preparing {v.name} ...", flush=True)
        step = prepare_variant(v, base, batch, ref, row)
        if step is not None:
            steps[v.name] = step
        print(
            f"[{time.perf_counter() - t_start:7.1f}s]   {v.name}: {row['status']}"
            + (f" ({row['error'][:200]})" if row["error"] else
               f" compile {row['compile_s']:.1f}s saved {row['saved_mib']:.2f} MiB "
               f"peak {row['peak_mib']:.2f} MiB grad err {row['grad_rel_err']:.1e}"),
            flush=True,
        )
        rows.append(row)

    # Timing: all surviving variants side by side, interleaved rounds.
    if steps:
        baseline = args.baseline if args.baseline in steps else next(iter(steps))
        if baseline != args.baseline:
            print(f"baseline {args.baseline!r} unavailable; step_ratio is relative to "
                  f"{baseline!r} in this run", flush=True)
        print(f"[{time.perf_counter() - t_start:7.1f}s] timing {len(steps)} variants, "
              f"{args.rounds} rounds ...", flush=True)
        timing = measure.interleaved_step_ratios(
            steps, baseline=baseline, rounds=args.rounds, warmup=args.warmup
        )
        for row in rows:
            t = timing.get(row["variant"])
            if t is None:
                continue
            if t["error"]:
                row["status"] = "failed"
                row["error"] = "timing: " + t["error"][:480]
                continue
            row["step_ms"] = t["median_s"] * 1e3
            row["step_ratio"] = t["ratio"]
    else:
        baseline = None

    base_saved = next(
        (r["saved_mib"] for r in rows if r["variant"] == "inductor" and r["status"] == "ok"),
        None,
    )
    for row in rows:
        if base_saved and row["saved_mib"] is not None:
            row["saved_frac"] = row["saved_mib"] / base_saved

    elapsed = time.perf_counter() - t_start
    meta = machine_description()
    meta.update(
        {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "baseline": baseline,
            "batch_shape": list(batch["input_ids"].shape),
            "n_params": sum(p.numel() for p in base.parameters()),
            "elapsed_s": elapsed,
        }
    )
    # e2e_llama4, e2e_gpt2_4: a separator only where the name ends in a digit.
    sep = "_" if args.model[-1:].isdigit() else ""
    stem = f"e2e_{args.model}{sep}{args.layers}{args.tag}"
    paths = write_outputs(args.out, stem, rows, meta)

    print()
    print(f"{args.model} {args.layers} layers, batch {tuple(batch['input_ids'].shape)}, "
          f"{meta['n_params'] / 1e6:.2f} M params; ratios to {baseline}, median of "
          f"{args.rounds} interleaved rounds")
    print(format_table(rows))
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {elapsed:.0f} s")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
