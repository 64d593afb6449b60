"""Debug dumps: what adacc saw, what it decided, and what that predicts.

:func:`write_dumps` writes one directory per compiled graph,
``<dump_dir>/<graph_id>/``, holding:

``joint_graph.py``, ``forward_graph.py``, ``backward_graph.py``
    Readable code of the joint forward+backward graph and of the forward and
    backward graphs after partitioning (``GraphModule.print_readable``). A graph
    that was not available is not written. Node names in these files are the
    names used in ``plan.*`` and ``memory_timeline.csv``.
``plan.json``
    The full :class:`~adacc_compiler.plan.Plan` (``Plan.to_json()``); load it
    back with ``Plan.from_json(path.read_text())``.
``plan.txt``
    A header (budget, what stock Inductor saves, what the plan saves, predicted
    peak, estimated overhead, decision counts) followed by one row per relevant
    candidate activation: tensor, shape, dtype, bytes, producing op, layer,
    decision (``retain`` / ``recompute`` / ``drop``) and estimated recompute cost.
``solver.json``, ``solver.txt``
    The MILP solver summary: status, objective and bound (seconds of extra
    time), relative gap, solve time, model size (columns, rows, nonzeros),
    how many repeated layers share one decision vector, whether a warm start
    was used, and the reason if a non-MILP fallback plan was used instead.
    Non-finite numbers (e.g. an infinite gap) are written as strings
    (``"inf"``, ``"nan"``) so that the JSON is strict.
``memory_timeline.csv``
    One row per event of each schedule, columns
    ``schedule,event,phase,node,live_bytes,budget_bytes``: ``schedule`` is
    ``stock`` (what stock Inductor would do) or ``plan`` (adacc's plan),
    ``event`` the 0-based position in that schedule, ``phase`` ``forward`` or
    ``backward``, ``node`` the node executed, ``live_bytes`` the activation
    bytes alive after it, and ``budget_bytes`` the budget (same on every row).
``memory_timeline.png``
    The two timelines plotted against progress through the step (0..1, since
    the schedules have different numbers of events), in MiB, with the budget
    as a dashed line and a dotted vertical line where each backward starts.
    Needs matplotlib (``pip install matplotlib``); skipped with a warning
    without it.
``summary.json``
    A short summary of the plan (decision counts, bytes, overhead, solver
    status) and, under ``"extra"``, whatever the caller passed as ``extra``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
from typing import Any

import torch

from .plan import CHOICES, MemoryTimeline, Plan, SolverSummary

__all__ = ["write_dumps", "format_bytes", "format_seconds", "DUMP_FILES"]

log = logging.getLogger(__name__)

#: Every file name :func:`write_dumps` may write into a graph's directory.
DUMP_FILES = (
    "joint_graph.py",
    "forward_graph.py",
    "backward_graph.py",
    "plan.json",
    "plan.txt",
    "solver.json",
    "solver.txt",
    "memory_timeline.csv",
    "memory_timeline.png",
    "summary.json",
)

TIMELINE_COLUMNS = ("schedule", "event", "phase", "node", "live_bytes", "budget_bytes")

_warned_no_matplotlib = False

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``512 B``, ``1.50 KiB``, ``1.50 MiB``, ``2.00 GiB``."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    unit = 0
    while value >= 1024 and unit < len(_BYTE_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{sign}{value:.2f} {_BYTE_UNITS[unit]}"


def format_seconds(s: float) -> str:
    """Human-readable duration: ``12.3 us``, ``4.56 ms``, ``1.23 s``."""
    if not math.isfinite(s):
        return str(s)
    a = abs(s)
    if a < 1e-3:
        return f"{s * 1e6:.1f} us"
    if a < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def write_dumps(
    dump_dir: str | os.PathLike[str],
    graph_id: str,
    *,
    joint_gm: torch.fx.GraphModule | None,
    fw_gm: torch.fx.GraphModule | None,
    bw_gm: torch.fx.GraphModule | None,
    plan: Plan,
    stock_timeline: MemoryTimeline | None,
    plan_timeline: MemoryTimeline | None,
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write the debug dumps for one graph into ``dump_dir/graph_id/``.

    See the module docstring for the files written. Files of a previous dump
    into the same directory that this call does not produce (a graph that is
    now ``None``, the PNG without matplotlib) are removed so that the directory
    never mixes two compilations. Returns the directory.
    """
    out = pathlib.Path(dump_dir) / graph_id
    out.mkdir(parents=True, exist_ok=True)

    for name, gm in (
        ("joint_graph.py", joint_gm),
        ("forward_graph.py", fw_gm),
        ("backward_graph.py", bw_gm),
    ):
        path = out / name
        if gm is None:
            path.unlink(missing_ok=True)
        else:
            _write(path, _graph_code(gm))

    _write(out / "plan.json", plan.to_json() + "\n")
    _write(out / "plan.txt", _plan_header(plan) + "\n\n" + plan.table() + "\n")
    _write(out / "solver.json", _dumps(_solver_dict(plan.solver)))
    _write(out / "solver.txt", _solver_text(plan.solver))

    timelines = [
        (schedule, tl)
        for schedule, tl in (("stock", stock_timeline), ("plan", plan_timeline))
        if tl is not None
    ]
    _write(out / "memory_timeline.csv", _timeline_csv(timelines, plan.budget_bytes))

    png = out / "memory_timeline.png"
    png.unlink(missing_ok=True)
    if timelines:
        _plot_timelines(png, graph_id, timelines, plan.budget_bytes)

    summary: dict[str, Any] = {"graph_id": graph_id, "plan": _plan_summary(plan)}
    if extra is not None:
        summary["extra"] = extra
    _write(out / "summary.json", _dumps(summary))

    log.info("adacc: wrote dumps for %s to %s", graph_id, out)
    return out


# --------------------------------------------------------------------------- helpers


def _write(path: pathlib.Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _finite(obj: Any) -> Any:
    """Replace non-finite floats (which strict JSON lacks) by their string form."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, default=str) + "\n"


def _graph_code(gm: torch.fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False)
    except Exception as exc:  # noqa: BLE001 - a dump must not break compilation
        log.debug("print_readable failed (%s); dumping gm.code instead", exc)
        try:
            return gm.code
        except Exception as exc2:  # noqa: BLE001
            return f"# adacc: could not render this graph: {exc2!r}\n"


def _plan_header(plan: Plan) -> str:
    counts = plan.counts()
    relevant = sum(1 for d in plan.decisions if d.choice != "drop" or d.needed_by_backward)
    saved_delta = plan.predicted_saved_bytes - plan.stock_saved_bytes
    lines = [
        f"graph:                    {plan.graph_id}",
        f"budget:                   {format_bytes(plan.budget_bytes)} ({plan.budget_bytes} B)",
        f"stock saved for backward: {format_bytes(plan.stock_saved_bytes)} ({plan.stock_saved_bytes} B)",
        f"stock activation peak:    {format_bytes(plan.stock_peak_bytes)} ({plan.stock_peak_bytes} B)",
        f"plan saved for backward:  {format_bytes(plan.predicted_saved_bytes)} "
        f"({plan.predicted_saved_bytes} B; {format_bytes(saved_delta)} vs stock)",
        f"fixed saved inputs:       {format_bytes(plan.fixed_saved_bytes)}",
        f"predicted peak:           {format_bytes(plan.predicted_peak_bytes)} "
        f"({plan.predicted_peak_bytes} B; "
        f"{'within' if plan.predicted_peak_bytes <= plan.budget_bytes else 'OVER'} budget)",
        f"estimated overhead:       {format_seconds(plan.estimated_overhead_s)} per step",
        "decisions:                "
        + ", ".join(f"{counts[c]} {c}" for c in CHOICES)
        + f" ({len(plan.decisions)} candidates, {relevant} listed below)",
        f"solver:                   {plan.solver.status}"
        + (f" (fallback: {plan.solver.fallback})" if plan.solver.fallback else ""),
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _solver_dict(solver: SolverSummary) -> dict[str, Any]:
    return dataclasses.asdict(solver)


def _solver_text(s: SolverSummary) -> str:
    gap = f"{s.gap * 100:.3f} %" if math.isfinite(s.gap) else str(s.gap)
    lines = [
        f"status:        {s.status}",
        f"objective:     {format_seconds(s.objective_s)} ({s.objective_s!r} s)",
        f"bound:         {format_seconds(s.bound_s)} ({s.bound_s!r} s)",
        f"gap:           {gap}",
        f"solve time:    {format_seconds(s.time_s)}",
        f"size:          {s.num_columns} columns, {s.num_rows} rows, {s.num_nonzeros} nonzeros",
        f"shared layers: {s.shared_layers}",
        f"warm start:    {'yes' if s.warm_start else 'no'}",
        f"fallback:      {s.fallback if s.fallback else 'none'}",
    ]
    return "\n".join(lines) + "\n"


def _timeline_csv(timelines: list[tuple[str, MemoryTimeline]], budget_bytes: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TIMELINE_COLUMNS)
    for schedule, tl in timelines:
        for i, (label, phase, live) in enumerate(zip(tl.labels, tl.phases, tl.live_bytes)):
            writer.writerow((schedule, i, phase, label, int(live), int(budget_bytes)))
    return buf.getvalue()


def _plan_summary(plan: Plan) -> dict[str, Any]:
    return {
        "counts": plan.counts(),
        "num_candidates": len(plan.decisions),
        "budget_bytes": plan.budget_bytes,
        "stock_saved_bytes": plan.stock_saved_bytes,
        "stock_peak_bytes": plan.stock_peak_bytes,
        "predicted_saved_bytes": plan.predicted_saved_bytes,
        "saved_bytes_reduction": plan.stock_saved_bytes - plan.predicted_saved_bytes,
        "fixed_saved_bytes": plan.fixed_saved_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "within_budget": plan.predicted_peak_bytes <= plan.budget_bytes,
        "estimated_overhead_s": plan.estimated_overhead_s,
        "retained_bytes": sum(d.nbytes for d in plan.decisions if d.choice == "retain"),
        "recomputed_bytes": sum(d.nbytes for d in plan.decisions if d.choice == "recompute"),
        "compressed_bytes": sum(d.nbytes for d in plan.decisions if d.choice == "compress"),
        "compressed_payload_bytes": sum(d.compressed_nbytes or 0 for d in plan.decisions if d.choice == "compress"),
        "codecs": {
            c: sum(1 for d in plan.decisions if d.codec == c) for c in sorted({d.codec for d in plan.decisions if d.codec})
        },
        # Summed relative noise of the lossy codecs, in dB (null: none lossy).
        "plan_sqnr_db": sqnr if math.isfinite(sqnr := plan.plan_sqnr_db()) else None,
        "solver_status": plan.solver.status,
        "solver_fallback": plan.solver.fallback,
    }


def _plot_timelines(
    path: pathlib.Path,
    graph_id: str,
    timelines: list[tuple[str, MemoryTimeline]],
    budget_bytes: int,
) -> None:
    """Plot with matplotlib's object API and the Agg canvas.

    This never touches pyplot or the global backend, so it neither opens a
    window nor changes a backend the user chose.
    """
    global _warned_no_matplotlib
    try:
        import matplotlib  # noqa: F401 - fails first (and cleanly) when it is absent
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_no_matplotlib:
            _warned_no_matplotlib = True
            log.warning(
                "adacc: matplotlib is not installed, so memory_timeline.png is not written "
                "(the other dumps are); install it with `pip install matplotlib`"
            )
        return

    mib = float(2**20)
    fig = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"stock": {"color": "tab:gray"}, "plan": {"color": "tab:blue"}}
    for schedule, tl in timelines:
        n = len(tl.live_bytes)
        if n == 0:
            continue
        xs = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        ys = [b / mib for b in tl.live_bytes]
        color = styles.get(schedule, {}).get("color")
        ax.plot(
            xs,
            ys,
            drawstyle="steps-post",
            color=color,
            label=f"{schedule} (peak {format_bytes(tl.peak)})",
        )
        bw_start = next((i for i, p in enumerate(tl.phases) if p == "backward"), None)
        if bw_start is not None:
            ax.axvline(
                xs[bw_start],
                color=color,
                linestyle=":",
                linewidth=1,
                label=f"{schedule} backward starts",
            )
    ax.axhline(
        budget_bytes / mib,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"budget ({format_bytes(budget_bytes)})",
    )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("progress through forward + backward (fraction of events)")
    ax.set_ylabel("live activations (MiB)")
    ax.set_title(f"{graph_id}: live activation memory")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
