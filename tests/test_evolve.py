"""Policy evolution: codec checks while training, and re-plans when the codecs drift."""

import math

import pytest
import torch

from adacc_compiler.backend import compiled_graphs
from adacc_compiler.config import AdaccConfig
from adacc_compiler.evolve import MAX_INTERVAL, CodecCheck, EvolvingGraph
from adacc_compiler.solver import InfeasibleBudgetError


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.SiLU(), torch.nn.Linear(512, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256)
    )


def _grad_error(model, compiled, x) -> float:
    """Largest relative error of the compiled model's gradients against eager's."""
    model.zero_grad()
    compiled(x).pow(2).mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return max(float((g - p.grad).norm() / p.grad.norm()) for g, p in zip(got, model.parameters()))


def _add_outlier_channels(model) -> None:
    # A few of the first layer's output channels grow 300x: per-token int8
    # scales follow them and the other channels round to a handful of levels.
    with torch.no_grad():
        model[0].weight[:4] *= 300.0
        model[0].bias[:4] *= 300.0


def _options(**extra):
    return {"memory_budget": 0.6, "profile": False, **extra}


def test_drifted_codecs_are_re_planned():
    model, x = _mlp(), torch.randn(64, 256)
    compiled = torch.compile(model, backend="adacc", options=_options(recheck_after=2))
    before = len(compiled_graphs())
    for _ in range(3):
        assert _grad_error(model, compiled, x) < 2e-2
    first = compiled_graphs()[before]
    codecs = {d.name: d.codec for d in first.plan.decisions if d.codec}
    assert "int8_token" in codecs.values(), first.plan.table()
    # The check at call 2 found the codecs as planned.
    (check,) = first.monitor.checks
    assert check.call == 2 and not check.drift
    assert check.plan_sqnr_db >= AdaccConfig().min_plan_sqnr_db - 1.0

    _add_outlier_channels(model)
    # Until the next check (call 6) the first plan runs on the drifted values.
    errors = [_grad_error(model, compiled, x) for _ in range(2)]
    assert min(errors) > 0.1, errors
    assert len(compiled_graphs()) == before + 1
    # Call 6 checks, finds the drift and runs a new plan made on the current values.
    after = _grad_error(model, compiled, x)
    assert after < 2e-2, after
    assert len(compiled_graphs()) == before + 2
    drifted = first.monitor.checks[-1]
    assert drifted.call == 6 and drifted.drift
    assert any("below min_sqnr_db" in d for d in drifted.drift), drifted.drift
    second = compiled_graphs()[-1]
    assert second.replaces == first.graph_id
    assert second.plan.notes and second.plan.notes[0].startswith(f"re-plan of {first.graph_id} at call 6")
    for d in second.plan.decisions:
        if d.codec and d.sqnr_db is not None:
            assert d.sqnr_db >= AdaccConfig().min_sqnr_db
    assert second.plan.plan_sqnr_db() >= AdaccConfig().min_plan_sqnr_db - 1e-9
    assert _grad_error(model, compiled, x) < 2e-2


def test_checks_without_drift_keep_the_plan():
    model, x = _mlp(), torch.randn(64, 256)
    compiled = torch.compile(model, backend="adacc", options=_options(recheck_after=1))
    before = len(compiled_graphs())
    for _ in range(8):
        _grad_error(model, compiled, x)
    assert len(compiled_graphs()) == before + 1
    record = compiled_graphs()[-1]
    # Calls 1, 3 and 7: each interval twice the one before.
    assert [c.call for c in record.monitor.checks] == [1, 3, 7]
    assert all(not c.drift for c in record.monitor.checks)
    # On the values the plan was made on, a check measures what planning did.
    planned = {d.name: d.sqnr_db for d in record.plan.decisions if d.codec and d.sqnr_db is not None}
    assert planned and record.monitor.checks[0].sqnr_db == pytest.approx(planned, abs=1e-9)
    assert record.monitor.checks[-1].sqnr_db == record.monitor.checks[0].sqnr_db


def test_recheck_off_keeps_the_first_plan():
    model, x = _mlp(), torch.randn(64, 256)
    compiled = torch.compile(model, backend="adacc", options=_options(recheck_after=None))
    before = len(compiled_graphs())
    _grad_error(model, compiled, x)
    _add_outlier_channels(model)
    for _ in range(12):
        _grad_error(model, compiled, x)
    assert len(compiled_graphs()) == before + 1
    assert compiled_graphs()[-1].monitor.checks == []


class _Record:
    """A stand-in for a CompiledGraph record whose monitor reports ``drift`` at every check."""

    graph_id = "g"

    def __init__(self, drift=()):
        self.calls = []
        record = self

        class Monitor:
            checks: list = []

            def check(self, args, *, call):
                record.calls.append(call)
                return CodecCheck(call=call, sqnr_db={}, plan_sqnr_db=20.0, drift=tuple(drift), seconds=0.0)

        self.monitor = Monitor()


def test_a_drift_no_plan_fits_raises_with_the_smallest_budget():
    def replan(args, reason):
        raise InfeasibleBudgetError("smallest feasible 2000 bytes", min_feasible_bytes=2000, budget_bytes=1000)

    graph = EvolvingGraph(lambda *a: "ran", _Record(drift=["x (int8_token) at 12.0 dB"]), replan, first_check=2)
    assert graph() == "ran"
    with pytest.raises(InfeasibleBudgetError, match=r"at call 2 .*x \(int8_token\) at 12.0 dB.*smallest feasible 2000 bytes.*recheck_after=None") as err:
        graph()
    assert (err.value.min_feasible_bytes, err.value.budget_bytes) == (2000, 1000)


def test_schedule_doubles_up_to_the_cap():
    record = _Record()
    calls = record.calls
    graph = EvolvingGraph(lambda *a: None, record, lambda args, reason: None, first_check=3)
    for _ in range(3 + 6 + 12 + 24 + 4 * MAX_INTERVAL):
        graph()
    assert calls[:4] == [3, 9, 21, 45]
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert max(gaps) == MAX_INTERVAL and gaps[-1] == MAX_INTERVAL
    with pytest.raises(ValueError, match="recheck_after"):
        EvolvingGraph(lambda *a: None, record, lambda args, reason: None, first_check=0)


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "often", "0"])
def test_recheck_after_rejects_bad_values(value):
    with pytest.raises(ValueError, match="recheck_after"):
        AdaccConfig(recheck_after=value)


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, "x", True])
def test_recheck_tolerance_rejects_bad_values(value):
    with pytest.raises(ValueError, match="recheck_tolerance_db"):
        AdaccConfig(recheck_tolerance_db=value)


def test_recheck_options_parse():
    assert AdaccConfig().recheck_after == 10
    assert AdaccConfig(recheck_after="off").recheck_after is None
    assert AdaccConfig(recheck_after="25").recheck_after == 25
    cfg = AdaccConfig.from_options({}, environ={"ADACC_RECHECK_AFTER": "none", "ADACC_RECHECK_TOLERANCE_DB": "0.5"})
    assert cfg.recheck_after is None and cfg.recheck_tolerance_db == 0.5


def test_train_summary_counts_a_re_planned_graph_once():
    from types import SimpleNamespace

    from adacc_compiler.train import _plan_info

    def record(graph_id, budget, replaces=None, notes=()):
        plan = SimpleNamespace(
            graph_id=graph_id, budget_bytes=budget, stock_peak_bytes=2 * budget, stock_saved_bytes=2 * budget,
            predicted_saved_bytes=budget, predicted_peak_bytes=budget, notes=list(notes),
            counts=lambda: {"retain": 1, "recompute": 2, "compress": 3, "drop": 0},
            solver=SimpleNamespace(status="Optimal", time_s=1.0),
        )
        return SimpleNamespace(plan=plan, dump_path=None, replaces=replaces)

    info = _plan_info([
        record("g0", 100),
        record("h0", 50),
        record("g1", 100, replaces="g0", notes=["re-plan of g0 at call 10, its codecs drifted: x"]),
    ])
    assert info["budget_bytes"] == 150
    assert [g["replaces"] for g in info["graphs"]] == [None, None, "g0"]
    assert info["graphs"][2]["notes"][0].startswith("re-plan of g0 at call 10")
