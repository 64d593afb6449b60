"""Tests for adacc_compiler.dump: every dump file, their contents, and no-matplotlib."""

from __future__ import annotations

import csv
import json
import logging
import sys

import pytest
import torch

from adacc_compiler import dump
from adacc_compiler.dump import format_bytes, format_seconds, write_dumps
from adacc_compiler.plan import Decision, MemoryTimeline, Plan, SolverSummary

GRAPH_ID = "graph_000_3f2a1c"
MiB = 2**20


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)).sum()


class _Tinier(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * 2


def _plan() -> Plan:
    decisions = [
        Decision("mm", (8, 1024), "torch.float32", 8 * 1024 * 4, "aten.mm.default", "retain", 12e-6, 0, True),
        Decision("relu", (8, 1024), "torch.float32", 8 * 1024 * 4, "aten.relu.default", "recompute", 1.5e-6, 0, True),
        Decision("gelu_1", (8, 4096), "torch.bfloat16", 8 * 4096 * 2, "aten.gelu.default", "recompute", 3e-6, 1, True),
        Decision("view_3", (), "torch.float32", 4, "aten.view.default", "drop", 0.0, None, False),
        Decision("add_7", (8,), "torch.float32", 32, "aten.add.Tensor", "drop", 0.1e-6, None, True),
    ]
    solver = SolverSummary(
        status="Optimal",
        objective_s=4.5e-6,
        bound_s=4.4e-6,
        gap=0.02,
        time_s=0.031,
        num_columns=17,
        num_rows=23,
        num_nonzeros=61,
        shared_layers=2,
        warm_start=True,
        fallback=None,
    )
    return Plan(
        graph_id=GRAPH_ID,
        budget_bytes=3 * MiB // 2,
        stock_saved_bytes=2 * MiB,
        stock_peak_bytes=2 * MiB + 8192,
        predicted_saved_bytes=MiB,
        predicted_peak_bytes=MiB + 4096,
        estimated_overhead_s=4.5e-6,
        decisions=decisions,
        solver=solver,
        fixed_saved_bytes=128,
        notes=["hand-built for tests"],
    )


def _timelines() -> tuple[MemoryTimeline, MemoryTimeline]:
    stock = MemoryTimeline(
        labels=["mm", "relu", "gelu_1", "sum", "bw_sum", "bw_gelu", "bw_relu", "bw_mm"],
        phases=["forward"] * 4 + ["backward"] * 4,
        live_bytes=[MiB, 2 * MiB, 3 * MiB, 3 * MiB, 3 * MiB, 2 * MiB, MiB, 0],
    )
    plan = MemoryTimeline(
        labels=["mm", "relu", "gelu_1", "sum", "bw_sum", "re_relu", "re_gelu", "bw_gelu", "bw_relu", "bw_mm"],
        phases=["forward"] * 4 + ["backward"] * 6,
        live_bytes=[MiB, MiB, MiB, MiB, MiB, MiB + 2048, MiB + 4096, MiB, MiB // 2, 0],
    )
    return stock, plan


def _gms() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, torch.fx.GraphModule]:
    return (
        torch.fx.symbolic_trace(_Tiny()),
        torch.fx.symbolic_trace(_Tinier()),
        torch.fx.symbolic_trace(torch.nn.ReLU()),
    )


@pytest.fixture(autouse=True)
def _reset_warning_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dump, "_warned_no_matplotlib", False)


def _write_all(tmp_path, **overrides):
    joint, fw, bw = _gms()
    stock, planned = _timelines()
    kwargs = dict(
        joint_gm=joint,
        fw_gm=fw,
        bw_gm=bw,
        plan=_plan(),
        stock_timeline=stock,
        plan_timeline=planned,
        extra={"model": "tiny", "step": 3},
    )
    kwargs.update(overrides)
    return write_dumps(tmp_path, GRAPH_ID, **kwargs)


def test_format_bytes_and_seconds() -> None:
    assert format_bytes(3 * MiB // 2) == "1.50 MiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(2 * 2**30) == "2.00 GiB"
    assert format_bytes(-MiB) == "-1.00 MiB"
    assert format_seconds(4.5e-6) == "4.5 us"
    assert format_seconds(0.031) == "31.00 ms"


def test_all_files_written(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="adacc_compiler.dump"):
        out = _write_all(tmp_path)
    assert out == tmp_path / GRAPH_ID
    assert sorted(p.name for p in out.iterdir()) == sorted(dump.DUMP_FILES)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and str(out) in infos[0].getMessage()

    assert "class" in (out / "joint_graph.py").read_text() and "relu" in (out / "joint_graph.py").read_text()
    assert "sigmoid" in (out / "forward_graph.py").read_text()

    # plan.json round-trips.
    assert Plan.from_json((out / "plan.json").read_text()) == _plan()

    # plan.txt: header in human units, every relevant tensor with its decision.
    text = (out / "plan.txt").read_text()
    assert "1.50 MiB" in text  # budget
    assert "2.00 MiB" in text  # stock saved
    assert "4.5 us" in text  # overhead
    assert "1 retain, 2 recompute, 0 compress, 2 drop" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for d in _plan().decisions:
        relevant = d.choice != "drop" or d.needed_by_backward
        assert (d.name in rows) == relevant, d.name
        if relevant:
            assert d.choice in rows[d.name].split()

    # solver dumps.
    solver = json.loads((out / "solver.json").read_text())
    assert solver["status"] == "Optimal" and solver["num_columns"] == 17 and solver["warm_start"] is True
    solver_txt = (out / "solver.txt").read_text()
    for needle in ("Optimal", "17 columns", "23 rows", "61 nonzeros", "2.000 %", "warm start:    yes"):
        assert needle in solver_txt

    # summary.json: plan summary plus extra.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"] == {"model": "tiny", "step": 3}
    assert summary["plan"]["counts"] == {"retain": 1, "recompute": 2, "compress": 0, "drop": 2}
    assert summary["plan"]["saved_bytes_reduction"] == MiB

    # PNG magic.
    assert (out / "memory_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_csv(tmp_path) -> None:
    out = _write_all(tmp_path)
    stock, planned = _timelines()
    with open(out / "memory_timeline.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["schedule", "event", "phase", "node", "live_bytes", "budget_bytes"]
        rows = list(reader)
    assert len(rows) == len(stock.labels) + len(planned.labels)
    for schedule, tl in (("stock", stock), ("plan", planned)):
        mine = [r for r in rows if r["schedule"] == schedule]
        assert [int(r["event"]) for r in mine] == list(range(len(tl.labels)))
        assert [r["node"] for r in mine] == tl.labels
        assert [r["phase"] for r in mine] == tl.phases
        assert [int(r["live_bytes"]) for r in mine] == tl.live_bytes
    assert {int(r["budget_bytes"]) for r in rows} == {3 * MiB // 2}


def test_none_graphs_are_skipped_and_stale_files_removed(tmp_path) -> None:
    out = _write_all(tmp_path)
    assert (out / "joint_graph.py").exists()
    out = _write_all(tmp_path, joint_gm=None, bw_gm=None, extra=None)
    assert not (out / "joint_graph.py").exists()
    assert not (out / "backward_graph.py").exists()
    assert (out / "forward_graph.py").exists()
    assert "extra" not in json.loads((out / "summary.json").read_text())


def test_no_timelines(tmp_path) -> None:
    out = _write_all(tmp_path, stock_timeline=None, plan_timeline=None)
    assert not (out / "memory_timeline.png").exists()
    with open(out / "memory_timeline.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []


def test_non_finite_solver_numbers_are_strict_json(tmp_path) -> None:
    import dataclasses

    plan = _plan()
    plan.solver = dataclasses.replace(plan.solver, status="Time limit", gap=float("inf"), fallback="greedy")
    out = _write_all(tmp_path, plan=plan)
    raw = (out / "solver.json").read_text()
    assert "Infinity" not in raw
    assert json.loads(raw)["gap"] == "inf"
    assert "fallback:      greedy" in (out / "solver.txt").read_text()
    assert "fallback: greedy" in (out / "plan.txt").read_text()


def test_without_matplotlib(tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.INFO, logger="adacc_compiler.dump"):
        out = _write_all(tmp_path)
        _write_all(tmp_path / "again")
    names = {p.name for p in out.iterdir()}
    assert names == set(dump.DUMP_FILES) - {"memory_timeline.png"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not per graph
    assert "pip install matplotlib" in warnings[0].getMessage()
    assert Plan.from_json((out / "plan.json").read_text()) == _plan()
