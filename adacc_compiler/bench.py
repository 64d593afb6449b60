"""Side-by-side comparison of activation-memory strategies, its regression check and plots.

``adacc bench`` (see :mod:`adacc_compiler.cli`) runs :func:`run_bench`: all
variants live side by side in ONE process, each on its own deep copy of the
same initial weights, trained on the same batch:

  eager        plain eager fp32
  ac           eager + activation checkpointing of every layer (non-reentrant)
  inductor     stock torch.compile(backend="inductor")  -- the baseline
  pt<b>        Inductor with torch._functorch.config.activation_memory_budget=b
  adacc<b>     torch.compile(backend="adacc", options={"memory_budget": b})

Per variant: saved-activation MiB (saved-tensor pack hooks, parameters,
buffers and inputs excluded), peak MiB of a full fwd+bwd step, step-time ratio
to stock Inductor (median over interleaved rounds), gradient relative error
against eager fp32, compile time, and for adacc the budget its plans were
made for. A variant that fails to build, compile or run is reported with
status "failed" and its error; the others go on.

:func:`check_results` compares a run with a baseline run (the regression
check behind ``adacc bench --check``), and :func:`plot_pareto` draws measured
memory against step-time ratio for one or several runs. ``bench/README.md``
describes every column and the measurement method.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from adacc_compiler import measure
from adacc_compiler.models import MODELS, enable_activation_checkpointing, loss_of, make_model
from adacc_compiler.plan import combined_sqnr_db

__all__ = [
    "BenchConfig",
    "BenchResult",
    "CheckReport",
    "COLUMNS",
    "FAMILIES",
    "Variant",
    "adacc_backend_ref",
    "check_results",
    "check_setup_matches",
    "format_table",
    "load_results",
    "make_step",
    "make_variants",
    "plot_pareto",
    "prepare_variant",
    "run_bench",
    "save_baseline",
    "select_variants",
    "write_outputs",
]

log = logging.getLogger(__name__)

MiB = float(1 << 20)
FAMILIES = ("eager", "ac", "inductor", "pt", "adacc")
#: Values of adacc's ``compress`` option (None: adacc's default).
COMPRESS_CHOICES = ("lossy", "lossless", "off")
#: Measured saved memory may exceed an adacc variant's budget by this fraction
#: before the regression check fails (the pack hooks count whole storages).
MEMORY_ALLOWANCE = 0.02
#: A gradient further than this (relative norm) from eager fp32's is wrong, not
#: lossy: lossy codecs stay within a few percent.
MAX_GRAD_ERROR = 0.5

COLUMNS = [
    "model",
    "layers",
    "variant",
    "budget",
    "saved_mib",
    "saved_frac",
    "peak_mib",
    "step_ratio",
    "step_ratio_lo",
    "step_ratio_hi",
    "step_ms",
    "grad_rel_err",
    "compile_s",
    "graphs",
    "budget_mib",
    "plan_peak_mib",
    "plan_overhead_ms",
    "plan_sqnr_db",
    "compress",
    "status",
    "error",
]


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def _results_stem(model: str, layers: int, tag: str) -> str:
    # e2e_llama4, e2e_gpt2_4, e2e_gpt_2: a separator only where the digits
    # would run into the name or read as another model's name.
    ambiguous = model[-1:].isdigit() or any(m != model and m.startswith(model) for m in MODELS)
    return f"e2e_{model}{'_' if ambiguous else ''}{layers}{tag}"


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`run_bench` runs. Every field is validated on construction."""

    model: str = "llama"
    layers: int = 4
    batch: int | None = None  # None: the model factory's default
    seq: int | None = None
    width: int | None = None
    budgets: tuple[float, ...] = (0.7, 0.6, 0.5, 0.45, 0.4)
    pt_budgets: tuple[float, ...] = (0.7, 0.5, 0.3, 0.1)
    variants: str | None = None  # comma-separated names or families; None: all
    baseline: str = "inductor"
    rounds: int = 10
    warmup: int = 2
    seed: int = 0
    out: Path = Path("adacc_bench_out")
    tag: str = ""
    compress: str | None = None  # adacc's `compress` option for every adacc variant; None: its default
    # Any other adacc options for every adacc variant (validated by AdaccConfig).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from adacc_compiler.config import AdaccConfig

        bad = sorted(set(self.options) & {"memory_budget", "compress"})
        if bad:
            raise ValueError(f"options: set {', '.join(bad)} through the budgets and compress fields")
        AdaccConfig.from_options(self.options, environ={})
        if self.compress is not None and self.compress not in COMPRESS_CHOICES:
            raise ValueError(f"compress: must be one of {COMPRESS_CHOICES} (or None for adacc's default), got {self.compress!r}")
        if self.model not in MODELS:
            raise ValueError(f"model: unknown model {self.model!r}; choose from {sorted(MODELS)}")
        for name in ("layers", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be at least 0, got {self.warmup}")
        for name in ("batch", "seq", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value}")
        for name in ("budgets", "pt_budgets"):
            for b in getattr(self, name):
                if not 0.0 < b <= 1.0:
                    raise ValueError(f"{name}: each budget must be a fraction in (0, 1], got {b}")
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        object.__setattr__(self, "pt_budgets", tuple(float(b) for b in self.pt_budgets))
        object.__setattr__(self, "out", Path(self.out))

    @property
    def stem(self) -> str:
        return _results_stem(self.model, self.layers, self.tag)


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    paths: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r["status"] == "ok" for r in self.rows)


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    family: str
    budget: float | None
    # Takes a fresh model copy, returns the callable used as fwd(**batch).
    build: Callable[[nn.Module], Callable]
    compiled: bool
    # Context manager factory wrapped around the first (compiling) step.
    compile_ctx: Callable[[], Any] | None = None


def _build_eager(m: nn.Module) -> Callable:
    return m


def _build_ac(m: nn.Module) -> Callable:
    return enable_activation_checkpointing(m)


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


def adacc_backend_ref() -> Any:
    """``"adacc"`` when the entry point registered it, else the backend callable itself."""
    from torch._dynamo.backends.registry import list_backends

    if "adacc" in list_backends(exclude_tags=()):
        return "adacc"
    from adacc_compiler.backend import adacc_backend

    return adacc_backend


def _build_adacc(budget: float, options: dict[str, Any] | None = None) -> Callable[[nn.Module], Callable]:
    def build(m: nn.Module) -> Callable:
        return torch.compile(m, backend=adacc_backend_ref(), options={**(options or {}), "memory_budget": budget})

    return build


def make_variants(
    budgets: Sequence[float], pt_budgets: Sequence[float], *, adacc_options: dict[str, Any] | None = None
) -> list[Variant]:
    """Every variant, in the order they are prepared; ``adacc_options`` go to each adacc variant."""
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
                compile_ctx=lambda b=b: torch._functorch.config.patch(activation_memory_budget=b),
            )
        )
    for b in budgets:
        vs.append(Variant(f"adacc{b:g}", "adacc", b, _build_adacc(b, adacc_options), compiled=True))
    return vs


def select_variants(vs: list[Variant], spec: str | None) -> list[Variant]:
    """Keep variants whose name or family is in the comma-separated ``spec``."""
    if not spec:
        return vs
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    known = {v.name for v in vs} | set(FAMILIES)
    unknown = wanted - known
    if unknown:
        raise ValueError(f"variants: unknown {sorted(unknown)}; known: {sorted(known)}")
    return [v for v in vs if v.name in wanted or v.family in wanted]


# --------------------------------------------------------------------------
# Measurement of one variant
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _compile_isolation():
    """Compile settings under which every variant gets, and keeps, its own partition.

    * The on-disk FX graph cache and AOTAutograd cache would (a) make
      compile_s measure a cache hit from an earlier run rather than a compile,
      and (b) hand one variant an artefact compiled for another if anything
      that matters (activation_memory_budget, adacc's options) were not part of
      the cache key. Both are off.
    * Dynamo keeps compiled frames per *code object* (one forward shared by
      every copy of the model) and reuses an entry whose guards pass and whose
      backend compares equal; each pt<b> variant therefore gets its own
      backend callable, the recompile limit is raised so 10+ variants fit, and
      hitting it is an error instead of a silent fall-back to eager.
    torch._dynamo.reset() between variants is not an option: every variant
    must stay compiled for the interleaved timing rounds.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        stack.enter_context(
            torch._dynamo.config.patch(
                recompile_limit=64,
                accumulated_recompile_limit=1024,
                fail_on_recompile_limit_hit=True,
            )
        )
        yield


def _graph_count() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def make_step(model: nn.Module, fwd: Callable, batch: dict) -> Callable[[], None]:
    """One training step without the optimizer: zero grads, forward, backward."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_of(fwd(**batch)).backward()

    return step


def _error_text(e: BaseException) -> str:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return msg[:500]


def prepare_variant(
    v: Variant,
    base: nn.Module,
    batch: dict,
    ref: nn.Module | None,
    row: dict,
    *,
    device: str = "cpu",
) -> Callable[[], None] | None:
    """Build, compile and measure ``v`` (everything but timing). Fills ``row``.

    ``ref`` holds reference gradients for ``grad_rel_err`` (``None`` skips
    it); ``device`` is where the peak memory is measured. Returns the step to
    time, or ``None`` if the variant failed.
    """
    from adacc_compiler.backend import compiled_graphs

    try:
        model = copy.deepcopy(base)
        fwd = v.build(model)
        step = make_step(model, fwd, batch)

        g0 = _graph_count()
        plans0 = len(compiled_graphs())
        ctx = v.compile_ctx() if v.compile_ctx is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            step()
        row["compile_s"] = time.perf_counter() - t0
        graphs = _graph_count() - g0
        row["graphs"] = graphs
        if v.compiled and graphs == 0:
            raise RuntimeError("no new graph was compiled for this variant (a cached graph of another variant was reused?)")
        if v.family == "adacc":
            # Each compiled graph has its own budget; saved bytes of all graphs
            # together are bounded by the sum.
            plans = [g.plan for g in compiled_graphs()[plans0:]]
            if not plans:
                raise RuntimeError("adacc compiled no graph that needs gradients for this variant")
            row["budget_mib"] = sum(p.budget_bytes for p in plans) / MiB
            row["plan_peak_mib"] = sum(p.predicted_peak_bytes for p in plans) / MiB
            # What the plans expected, next to what the rounds measure: their
            # objective (not net of stock Inductor's own recomputation), and
            # the error of all the graphs' lossy codecs together.
            row["plan_overhead_ms"] = 1e3 * sum(p.estimated_overhead_s for p in plans)
            sqnr = combined_sqnr_db(p.plan_sqnr_db() for p in plans)
            row["plan_sqnr_db"] = None if math.isinf(sqnr) else sqnr  # empty: no lossy codec
            # What the compiles really used: the option, else ADACC_COMPRESS, else the default.
            row["compress"] = getattr(compiled_graphs()[plans0].config, "compress", None)

        if ref is not None:
            row["grad_rel_err"] = measure.grad_relative_error(ref, model)

        exclude = [*model.parameters(), *model.buffers(), *batch.values()]
        row["saved_mib"] = measure.saved_activation_bytes(lambda: loss_of(fwd(**batch)), exclude=exclude) / MiB
        row["peak_mib"] = measure.peak_memory_bytes(step, device=device) / MiB
        row["status"] = "ok"
        return step
    except Exception as e:  # noqa: BLE001 - report and go on
        row["status"] = "failed"
        row["error"] = _error_text(e)
        log.info("variant %s failed:\n%s", v.name, traceback.format_exc())
        return None


# --------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------


def _git(*args: str) -> str:
    """stdout of a git command run in this package's checkout; empty when git cannot tell."""
    try:
        return subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_description() -> dict[str, Any]:
    """Platform, CPU model, cores, library versions, git commit and date."""
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
    commit = _git("rev-parse", "HEAD").strip() or None
    # Tracked files changed since that commit: the run's code is not the commit's.
    status = _git("status", "--porcelain", "--untracked-files=no")
    git_changed = sorted(line[3:] for line in status.splitlines() if line.strip()) if commit else None
    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:  # noqa: BLE001 - optional
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
        "git_changed_files": git_changed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _progress(t_start: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)


def run_bench(config: BenchConfig, *, write: bool = True) -> BenchResult:
    """Build, compile, measure and time every selected variant; write CSV, JSON and a plot.

    Progress goes to stdout. Nothing raises for a failing variant: its row
    says ``failed`` and why.
    """
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - transformers is optional for the plain GPT
        pass

    t_start = time.perf_counter()
    adacc_options = {**config.options, **({} if config.compress is None else {"compress": config.compress})}
    variants = select_variants(
        make_variants(config.budgets, config.pt_budgets, adacc_options=adacc_options), config.variants
    )
    torch.manual_seed(config.seed)
    kw: dict[str, Any] = {"seed": config.seed}
    for name in ("batch", "seq", "width"):
        if getattr(config, name) is not None:
            kw[name] = getattr(config, name)
    base, batch = make_model(config.model, config.layers, **kw)
    base = base.float().train()

    # Reference gradients: eager fp32, same weights, same batch, one step.
    ref = copy.deepcopy(base)
    make_step(ref, ref, batch)()

    rows: list[dict[str, Any]] = []
    steps: dict[str, Callable[[], None]] = {}
    with _compile_isolation():
        for v in variants:
            row: dict[str, Any] = {k: None for k in COLUMNS}
            row.update(model=config.model, layers=config.layers, variant=v.name, budget=v.budget, status="failed", error="")
            _progress(t_start, f"preparing {v.name} ...")
            step = prepare_variant(v, base, batch, ref, row)
            if step is not None:
                steps[v.name] = step
            _progress(
                t_start,
                f"  {v.name}: {row['status']}"
                + (
                    f" ({row['error'][:200]})"
                    if row["error"]
                    else f" compile {row['compile_s']:.1f}s saved {row['saved_mib']:.2f} MiB "
                    f"peak {row['peak_mib']:.2f} MiB grad err {_fmt(row['grad_rel_err'], '.1e')}"
                ),
            )
            rows.append(row)

        # Timing: all surviving variants side by side, interleaved rounds.
        baseline = None
        if steps:
            baseline = config.baseline if config.baseline in steps else next(iter(steps))
            if baseline != config.baseline:
                print(f"baseline {config.baseline!r} unavailable; step_ratio is relative to {baseline!r} in this run")
            _progress(t_start, f"timing {len(steps)} variants, {config.rounds} rounds ...")
            timing = measure.interleaved_step_ratios(steps, baseline=baseline, rounds=config.rounds, warmup=config.warmup)
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
                row["step_ratio_lo"], row["step_ratio_hi"] = t["ratio_lo"], t["ratio_hi"]

    base_saved = next((r["saved_mib"] for r in rows if r["variant"] == "inductor" and r["status"] == "ok"), None)
    for row in rows:
        if base_saved and row["saved_mib"] is not None:
            row["saved_frac"] = row["saved_mib"] / base_saved

    meta = machine_description()
    meta.update(
        {
            "config": _config_dict(config),
            "baseline": baseline,
            "batch_shape": list(next(iter(batch.values())).shape),
            "n_params": sum(p.numel() for p in base.parameters()),
            "elapsed_s": time.perf_counter() - t_start,
        }
    )
    result = BenchResult(rows, meta)
    if write:
        result.paths = write_outputs(config.out, config.stem, rows, meta)
    return result


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    out = {}
    for k in config.__dataclass_fields__:
        v = getattr(config, k)
        out[k] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _interval(row: dict[str, Any]) -> str:
    lo, hi = row.get("step_ratio_lo"), row.get("step_ratio_hi")
    if not (_finite(lo) and _finite(hi)):
        return "-"
    return f"{lo:.3f}-{hi:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'variant':<12} {'budget':>6} {'saved MiB':>10} {'saved/ind':>9} "
        f"{'peak MiB':>9} {'ratio':>6} {'95% interval':>13} {'step ms':>8} {'grad err':>9} "
        f"{'compile s':>9}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<12} {_fmt(r['budget'], '>6g'):>6} "
            f"{_fmt(r['saved_mib'], '>10.2f'):>10} {_fmt(r.get('saved_frac'), '>9.3f'):>9} "
            f"{_fmt(r['peak_mib'], '>9.2f'):>9} {_fmt(r['step_ratio'], '>6.3f'):>6} {_interval(r):>13} "
            f"{_fmt(r.get('step_ms'), '>8.1f'):>8} {_fmt(r.get('grad_rel_err'), '>9.1e'):>9} "
            f"{_fmt(r.get('compile_s'), '>9.1f'):>9}  {r['status']}"
            + (f": {r['error'][:120]}" if r.get("error") else "")
        )
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_outputs(out: Path, stem: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """``stem.csv``, ``stem.json`` (rows), ``stem_machine.json`` and ``stem_pareto.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps([{k: _json_safe(r.get(k)) for k in COLUMNS} for r in rows], indent=2) + "\n")
    machine_path = out / f"{stem}_machine.json"
    machine_path.write_text(json.dumps(meta, indent=2) + "\n")
    paths = [csv_path, json_path, machine_path]
    png = out / f"{stem}_pareto.png"
    if plot_pareto([rows], png):
        paths.append(png)
    return paths


def save_baseline(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """A baseline for :func:`check_results`: the rows plus the run's description."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": [{k: _json_safe(r.get(k)) for k in COLUMNS} for r in rows], "meta": meta}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_results(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, meta)`` from a results JSON (a list of rows) or a baseline (``{"rows", "meta"}``).

    For a plain results JSON, ``meta`` comes from the ``*_machine.json`` next
    to it when there is one, else it is empty.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read results from {path}: {err}") from None
    if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
        rows, meta = doc["rows"], dict(doc.get("meta") or {})
    elif isinstance(doc, list):
        rows = doc
        machine = path.with_name(path.stem + "_machine.json")
        meta = json.loads(machine.read_text()) if machine.is_file() else {}
    else:
        raise ValueError(f"{path} is neither a results JSON (a list of rows) nor a baseline ({{'rows': [...]}})")
    for r in rows:
        if not isinstance(r, dict) or "variant" not in r:
            raise ValueError(f"{path}: every row needs a 'variant'")
    return rows, meta


# --------------------------------------------------------------------------
# Regression check
# --------------------------------------------------------------------------


@dataclass
class CheckReport:
    """The verdict of :func:`check_results`: failures make it fail, notes do not."""

    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        lines = []
        verdict = "PASSED" if self.ok else "FAILED"
        lines.append(f"regression check {verdict}: {len(self.checked)} adacc variant(s) checked, {len(self.failures)} failure(s)")
        lines += [f"  FAIL {m}" for m in self.failures]
        lines += [f"  note {m}" for m in self.notes]
        return "\n".join(lines)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_results(
    rows: Iterable[dict[str, Any]],
    baseline_rows: Iterable[dict[str, Any]],
    *,
    tolerance: float,
    memory_allowance: float = MEMORY_ALLOWANCE,
    max_grad_error: float = MAX_GRAD_ERROR,
) -> CheckReport:
    """Compare the adacc variants of a run with a baseline run.

    A variant fails when

    * its step-time ratio to stock Inductor (both measured in the same run)
      exceeds the baseline's ratio for that variant by more than
      ``tolerance``, relative: ``ratio > baseline_ratio * (1 + tolerance)``;
    * its measured saved memory exceeds the budget its plans were made for
      by more than ``memory_allowance`` (relative);
    * its gradient's relative error against eager fp32 is not finite or
      exceeds ``max_grad_error`` (a wrong gradient, not a lossy one);
    * it failed in this run but not in the baseline, or the baseline has it
      and this run does not.

    A variant that failed in both runs (an infeasible budget, say) is noted,
    not failed; so is one the baseline lacks (only its memory is checked).
    The stock Inductor variant must have run: the ratios are relative to it.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance: must be a finite number >= 0 (relative, 0.1 = 10%), got {tolerance!r}")
    if not (isinstance(memory_allowance, (int, float)) and memory_allowance >= 0):
        raise ValueError(f"memory_allowance: must be a number >= 0, got {memory_allowance!r}")
    rows = list(rows)
    baseline_rows = list(baseline_rows)
    report = CheckReport()

    for name, rs in (("this run", rows), ("the baseline", baseline_rows)):
        keys = {(r.get("model"), r.get("layers")) for r in rs}
        if len(keys) > 1:
            raise ValueError(f"{name} mixes several models: {sorted(map(str, keys))}")
    cur_key = {(r.get("model"), r.get("layers")) for r in rows}
    base_key = {(r.get("model"), r.get("layers")) for r in baseline_rows}
    if cur_key and base_key and cur_key != base_key:
        raise ValueError(f"the baseline is for {sorted(map(str, base_key))[0]}, this run for {sorted(map(str, cur_key))[0]}")

    current = {r["variant"]: r for r in rows}
    base = {r["variant"]: r for r in baseline_rows}

    stock = current.get("inductor")
    stock_ok = stock is not None and stock.get("status") == "ok"
    if not stock_ok:
        why = "was not run" if stock is None else f"failed ({(stock.get('error') or '')[:200]})"
        report.failures.append(f"inductor: stock Inductor {why}; no step-time ratio can be checked")

    for name, b in base.items():
        if _family(name) == "adacc" and name not in current:
            report.failures.append(f"{name}: in the baseline but not run now (pass the same --budgets)")

    for name, r in current.items():
        if _family(name) != "adacc":
            continue
        b = base.get(name)
        status = r.get("status")
        if status != "ok":
            err = (r.get("error") or "")[:300]
            if b is not None and b.get("status") != "ok":
                report.notes.append(f"{name}: failed in this run and in the baseline: {err}")
            else:
                report.failures.append(f"{name}: failed: {err}")
            continue
        report.checked.append(name)

        saved, budget = r.get("saved_mib"), r.get("budget_mib")
        if _finite(saved) and _finite(budget):
            if saved > budget * (1 + memory_allowance):
                report.failures.append(
                    f"{name}: measured saved memory {saved:.2f} MiB exceeds its budget of {budget:.2f} MiB "
                    f"by {100 * (saved / budget - 1):.1f}% (allowance {100 * memory_allowance:.0f}%)"
                )
        else:
            report.notes.append(f"{name}: no measured saved memory or budget; memory not checked")
        err = r.get("grad_rel_err")
        if err is not None and not (_finite(err) and err <= max_grad_error):
            report.failures.append(
                f"{name}: gradient relative error {err:.3g} against eager fp32 exceeds {max_grad_error:g}: "
                "the compiled step computes a wrong gradient"
            )

        if b is None:
            report.notes.append(f"{name}: not in the baseline; step time not checked")
            continue
        ratio, base_ratio = r.get("step_ratio"), b.get("step_ratio")
        if not stock_ok:
            continue
        if b.get("status") != "ok" or not _finite(base_ratio):
            report.notes.append(f"{name}: the baseline has no step ratio for it; step time not checked")
            continue
        if not _finite(ratio):
            report.failures.append(f"{name}: no step ratio was measured")
            continue
        limit = base_ratio * (1 + tolerance)
        if ratio > limit:
            interval = _interval(r)
            report.failures.append(
                f"{name}: step-time ratio to stock Inductor {ratio:.3f} exceeds the baseline's {base_ratio:.3f} "
                f"by {100 * (ratio / base_ratio - 1):.1f}% (tolerance {100 * tolerance:.0f}%, limit {limit:.3f})"
                + ("" if interval == "-" else f"; this run's 95% interval {interval}")
            )
    if not report.checked and not report.failures:
        report.failures.append("no adacc variant ran in this run; nothing was checked")
    return report


#: Settings a baseline and the run checked against it must share: anything
#: else makes the ratios incomparable.
_SAME_SETUP = ("model", "layers", "batch", "seq", "width", "seed", "baseline", "compress", "options")


def check_setup_matches(config: BenchConfig, baseline_meta: dict[str, Any]) -> None:
    """Raise ``ValueError`` when the baseline was measured on another model or shape.

    Only baselines that record their configuration (``--save-baseline``
    files, results with a ``*_machine.json``) can be compared this way; for
    the others only the model and layers in the rows are checked.
    """
    recorded = baseline_meta.get("config")
    if not isinstance(recorded, dict):
        return
    here = _config_dict(config)
    diff = [f"{k}={recorded[k]!r} (this run: {here[k]!r})" for k in _SAME_SETUP if k in recorded and recorded[k] != here[k]]
    if diff:
        raise ValueError("check: the baseline was measured with " + ", ".join(diff) + "; run with the same settings")


def _family(name: str) -> str:
    for fam in ("adacc", "pt"):
        if name.startswith(fam) and name[len(fam):][:1].isdigit():
            return fam
    return name


# --------------------------------------------------------------------------
# Pareto plot
# --------------------------------------------------------------------------

_X_COLUMNS = {
    "saved": ("saved_mib", "measured saved for backward (MiB)"),
    "peak": ("peak_mib", "measured peak of a step (MiB)"),
}

_STYLE = {
    "adacc": {"color": "tab:blue", "marker": "o", "label": "adacc (memory_budget)"},
    "pt": {"color": "tab:orange", "marker": "s", "label": "PyTorch budgeted partitioner (activation_memory_budget)"},
    "ac": {"color": "tab:green", "marker": "^", "label": "activation checkpointing (eager)"},
    "inductor": {"color": "black", "marker": "*", "label": "stock Inductor"},
    "eager": {"color": "tab:gray", "marker": "X", "label": "eager"},
}


def _series(row: dict[str, Any]) -> str:
    """The plot series of a row: its family, adacc split by its ``compress`` setting."""
    fam = _family(row["variant"])
    if fam == "adacc" and row.get("compress"):
        return f"adacc:{row['compress']}"
    return fam


def _style(series: str) -> dict[str, Any]:
    if series in _STYLE:
        return _STYLE[series]
    mode = series.split(":", 1)[1]
    color = {"lossy": "tab:blue", "lossless": "tab:purple", "off": "tab:cyan"}.get(mode, "tab:blue")
    what = {
        "lossy": "retain / recompute / lossy compression",
        "lossless": "retain / recompute / lossless compression",
        "off": "retain / recompute only",
    }.get(mode, f"compress={mode}")
    return {"color": color, "marker": "o" if mode == "lossy" else "D", "label": f"adacc ({what})"}


def plot_pareto(
    runs: Sequence[list[dict[str, Any]]],
    path: str | os.PathLike[str],
    *,
    x: Sequence[str] = ("saved",),
    title: str | None = None,
) -> bool:
    """Memory (x) against step-time ratio to stock Inductor (y), one subplot per model.

    ``runs`` holds the rows of one or several runs; rows are grouped by
    ``(model, layers)``, one column of subplots per group, one row of
    subplots per entry of ``x`` (``"saved"`` and/or ``"peak"``). adacc (one
    line per ``compress`` setting) and PyTorch's budgeted partitioner are
    drawn as lines through their budgets (in budget order), each point
    labelled with its budget; activation checkpointing, stock Inductor and
    eager as single markers. Where several runs of one model hold the same
    series, the first run's is drawn. Failed variants are left out. Returns
    ``False`` (after a warning) when matplotlib is missing, ``True`` once the
    PNG is written.
    """
    for xk in x:
        if xk not in _X_COLUMNS:
            raise ValueError(f"x: unknown axis {xk!r}; choose from {sorted(_X_COLUMNS)}")
    if not x:
        raise ValueError("x: name at least one axis")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; no Pareto plot written (pip install matplotlib)")
        return False

    # (model, layers) -> series -> rows, the first run holding a series wins.
    groups: dict[tuple[str, Any], dict[str, list[dict[str, Any]]]] = {}
    for rows in runs:
        by_series: dict[tuple[str, Any], dict[str, list[dict[str, Any]]]] = {}
        for r in rows:
            if r.get("status") == "ok" and _finite(r.get("step_ratio")):
                by_series.setdefault((str(r.get("model")), r.get("layers")), {}).setdefault(_series(r), []).append(r)
        for key, series in by_series.items():
            group = groups.setdefault(key, {})
            for name, rs in series.items():
                group.setdefault(name, rs)
    if not groups:
        raise ValueError("nothing to plot: no variant with a measured step ratio")

    ncols, nrows = len(groups), len(x)
    fig = Figure(figsize=(6.5 * ncols, 4.8 * nrows), dpi=110)
    FigureCanvasAgg(fig)
    handles: dict[str, Any] = {}
    present = {n for g in groups.values() for n in g}
    order = [*sorted(n for n in present if n.startswith("adacc:")), *(n for n in _STYLE if n in present)]
    for j, ((model, layers), series) in enumerate(groups.items()):
        for i, xk in enumerate(x):
            col, xlabel = _X_COLUMNS[xk]
            ax = fig.add_subplot(nrows, ncols, i * ncols + j + 1)
            for name in order:
                if name not in series or (name == "adacc" and any(n.startswith("adacc:") for n in series)):
                    continue
                style = _style(name)
                # A line runs through the budgets in order, whatever the memory does.
                pts = sorted(
                    ((r[col], r["step_ratio"], r.get("budget")) for r in series[name] if _finite(r.get(col))),
                    key=lambda p: (-(p[2] or 0.0), p[0]),
                )
                if not pts:
                    continue
                line = _family(series[name][0]["variant"]) in ("adacc", "pt")
                (h,) = ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    linestyle="-" if line else "none",
                    marker=style["marker"],
                    markersize=11 if name == "inductor" else 7,
                    color=style["color"],
                    label=style["label"],
                )
                handles.setdefault(name, h)
                if line:
                    for px, py, b in pts:
                        ax.annotate(
                            f"{b:g}",
                            (px, py),
                            textcoords="offset points",
                            xytext=(4, -11 if name == "pt" else 5),
                            fontsize=7,
                            color=style["color"],
                        )
            ax.axhline(1.0, color="black", linewidth=0.6, alpha=0.4)
            ax.margins(0.1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("step time / stock Inductor")
            ax.set_title(f"{model}, {layers} layers" + (f" ({xk})" if nrows > 1 else ""))
            ax.grid(True, alpha=0.3)
    names = [n for n in order if n in handles]
    fig.legend(
        [handles[n] for n in names],
        [_style(n)["label"] for n in names],
        loc="lower center",
        ncol=min(3, len(names)),
        fontsize="small",
    )
    legend_rows = math.ceil(len(names) / 3)
    fig.suptitle(title or "activation memory vs. step time (lower left is better; labels are budgets)", fontsize="medium")
    fig.tight_layout(rect=(0, 0.035 * legend_rows / nrows + 0.02, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return True
