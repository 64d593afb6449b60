"""The backend end to end: registration, options, gradients, memory, dumps, caches."""

import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import adacc_compiler
from tests.e2e import check, run_adacc
from tests.models import GPT, MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp_loss(model):
    torch.manual_seed(1)
    return model(torch.randn(32, 64))


def _gpt_loss(model):
    idx = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    return model(idx)


def test_backend_is_registered_without_import():
    code = "import torch, sys; sys.exit(0 if 'adacc' in torch._dynamo.list_backends() else 1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "adacc_compiler" not in sys.modules or True  # the subprocess, not this one, is what counts


@pytest.mark.parametrize(
    "options,needle",
    [({"memory_budgte": 0.5}, "accepted options"), ({"memory_budget": 2.5}, "memory_budget"),
     ({"solver_mip_gap": -1}, "solver_mip_gap")],
)
def test_bad_options_raise_value_errors(options, needle):
    torch._dynamo.reset()
    model = torch.compile(torch.nn.Linear(4, 4), backend="adacc", options=options)
    with pytest.raises(Exception) as err:
        model(torch.randn(2, 4)).sum().backward()
    assert needle in str(err.value)
    assert isinstance(err.value.__cause__ or err.value, ValueError) or "ValueError" in str(err.value)


def test_mode_is_rejected_clearly():
    torch._dynamo.reset()
    model = torch.compile(torch.nn.Linear(4, 4), backend="adacc", mode="max-autotune")
    with pytest.raises(Exception, match="mode"):
        model(torch.randn(2, 4))


def test_graphs_without_gradients_go_to_inductor_unchanged():
    torch._dynamo.reset()
    before = len(adacc_compiler.compiled_graphs())
    model = torch.compile(MLP(depth=2), backend="adacc")
    with torch.no_grad():
        out = model(torch.randn(8, 64))
    assert torch.isfinite(out)
    assert len(adacc_compiler.compiled_graphs()) == before


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.2])
def test_mlp_gradients_and_memory(budget):
    torch._dynamo.reset()
    result = run_adacc(MLP, _mlp_loss, budget)
    check(result)
    # Compiled at the budget asked for. No plan that rebuilds each value once
    # fits 0.5 or 0.2 (the smallest peaks at about 0.52): multi-rebuild plans do.
    assert result.plan.budget_bytes == math.floor(budget * result.plan.stock_peak_bytes)
    rebuilt_again = [d for d in result.plan.decisions if (d.rebuilds or 0) > 1]
    assert bool(rebuilt_again) == (result.plan.solver.status == "multi-rebuild") == (budget < 0.52)


def test_multi_rebuild_lowers_the_measured_step_peak(tmp_path):
    """The runtime peak of a step (profiler memory events) follows the simulated one.

    Batch 1024 makes activations dominate the parameters' gradients. The
    single-rebuild plan at 0.6 against the multi-rebuild plan at 0.2: the step
    peak must fall by at least 60% of the predicted fall of the activation
    peak (77% with torch 2.13; 53% before the copies were ordered after the
    previous region, when Inductor fused the regions' copies into one kernel).
    """
    from adacc_compiler.measure import peak_memory_bytes

    peaks, predicted = {}, {}
    for name, options in (("single", {"memory_budget": 0.6, "multi_rebuild": False}), ("multi", {"memory_budget": 0.2})):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP()
        options = {"profile": False, "compress": "off", "cache_dir": str(tmp_path), **options}
        compiled = torch.compile(model, backend="adacc", options=options)

        def step():
            torch.manual_seed(1)
            compiled(torch.randn(1024, 64)).backward()

        step()
        model.zero_grad(set_to_none=True)
        plan = adacc_compiler.last_plan()
        assert (plan.solver.status == "multi-rebuild") == (name == "multi")
        predicted[name] = plan.predicted_peak_bytes
        peaks[name] = peak_memory_bytes(step, device="cpu")
    assert predicted["multi"] < 0.5 * predicted["single"], predicted
    assert peaks["single"] - peaks["multi"] >= 0.6 * (predicted["single"] - predicted["multi"]), (peaks, predicted)


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.2])
def test_small_gpt_gradients_and_memory(budget):
    torch._dynamo.reset()
    result = run_adacc(GPT, _gpt_loss, budget)
    check(result)
    if budget < 1.0:
        assert result.plan.counts()["recompute"] > 0
    # 0.2 is feasible for this model: compiled at it, not at a fallback budget.
    assert result.plan.budget_bytes == math.floor(budget * result.plan.stock_peak_bytes)


def test_absolute_budget_and_measured_costs(tmp_path):
    torch._dynamo.reset()
    result = run_adacc(GPT, _gpt_loss, "1MiB", profile=True, cache_dir=str(tmp_path / "cache"))
    check(result)
    assert result.budget_bytes == 2**20
    assert (tmp_path / "cache").exists()


def test_overshooting_plan_is_not_planned_again(monkeypatch):
    """When a plan's exact simulation overshoots, the next round must not return it again.

    The first plan is made to simulate 64 bytes over the budget whenever it
    comes back; the next target has to sit below that plan's own model peak,
    or the solver would hand the same plan back round after round.
    """
    from adacc_compiler.passes import liveness
    from adacc_compiler.plan import MemoryTimeline

    torch._dynamo.reset()
    budget = 2**20
    real = liveness.simulate
    calls, seen = [], {}

    def simulate(info, fw, bw):
        timeline = real(info, fw, bw)
        calls.append(bw.code)
        if len(calls) == 1:  # stock Inductor's split
            return timeline
        seen.setdefault("first", bw.code)
        if bw.code != seen["first"]:
            return timeline
        shift = budget + 64 - timeline.peak
        return MemoryTimeline(timeline.labels, timeline.phases, [b + shift for b in timeline.live_bytes])

    monkeypatch.setattr(liveness, "simulate", simulate)
    result = run_adacc(GPT, _gpt_loss, budget)
    check(result)
    assert len(set(calls[1:])) >= 2, "the overshooting plan was the only one tried"


def test_remembered_smallest_peak_skips_the_milp_far_below_it(tmp_path, caplog):
    """A second compile far below the remembered single-rebuild floor goes straight to multi-rebuild."""
    options = {"memory_budget": 0.2, "profile": False, "compress": "off", "cache_dir": str(tmp_path)}
    plans = []
    for _ in range(2):
        torch._dynamo.reset()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="adacc_compiler.backend"):
            _mlp_loss(torch.compile(MLP(), backend="adacc", options=options)).backward()
        plans.append(adacc_compiler.last_plan())
        skipped = any("multi-rebuild plans only" in r.getMessage() for r in caplog.records)
        assert skipped == (len(plans) == 2)
    first, second = plans
    assert second.solver.status == first.solver.status == "multi-rebuild"
    assert [(d.name, d.choice, d.rebuilds) for d in second.decisions] == [
        (d.name, d.choice, d.rebuilds) for d in first.decisions
    ]
    assert second.predicted_peak_bytes == first.predicted_peak_bytes <= second.budget_bytes


@pytest.mark.parametrize("multi_rebuild", [True, False])
def test_infeasible_budget_states_smallest(multi_rebuild):
    torch._dynamo.reset()
    options = {"memory_budget": 0.01, "profile": False, "compress": "off", "multi_rebuild": multi_rebuild}
    model = torch.compile(MLP(), backend="adacc", options=options)
    with pytest.raises(Exception) as err:
        _mlp_loss(model).backward()
    text = str(err.value)
    assert "infeasible" in text and "smallest budget adacc finds feasible" in text and "memory_budget=0.01" in text
    fraction = float(re.search(r"\(([0-9.]+) of stock Inductor's peak", text).group(1))
    # Rebuilding once, a deep chain keeps about half its activations live; a
    # multi-rebuild plan holds about one layer's.
    assert (fraction < 0.2) if multi_rebuild else (fraction > 0.4), fraction


def test_dumps_and_info_log(tmp_path, caplog):
    torch._dynamo.reset()
    caplog.set_level(logging.INFO, logger="adacc_compiler")
    model = torch.compile(MLP(depth=4), backend="adacc",
                          options={"memory_budget": 0.8, "profile": False, "dump_dir": str(tmp_path)})
    _mlp_loss(model).backward()
    record = adacc_compiler.compiled_graphs()[-1]
    folder = tmp_path / record.graph_id
    for name in ("joint_graph.py", "forward_graph.py", "backward_graph.py", "plan.json", "plan.txt",
                 "solver.json", "memory_timeline.csv", "memory_timeline.png"):
        assert (folder / name).exists(), name
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["budget_bytes"] == record.plan.budget_bytes
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "budget" in r.getMessage()]
    assert any(record.graph_id in m and "predicted peak" in m and "solve" in m for m in infos)


_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    import adacc_compiler
    from tests.models import MLP
    torch.manual_seed(0)
    model = MLP(depth=6)
    compiled = torch.compile(model, backend="adacc", options={{"memory_budget": float(sys.argv[1]), "profile": False}})
    torch.manual_seed(1)
    compiled(torch.randn(32, 64)).backward()
    graphs = adacc_compiler.compiled_graphs()
    print(json.dumps([g.plan.budget_bytes for g in graphs]))
    """
)


def test_caches_never_hand_back_another_plan(tmp_path):
    """With Inductor's caches on and shared, every process plans for its own budget."""
    script = tmp_path / "run.py"
    script.write_text(_CACHE_SCRIPT.format(root=ROOT))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    budgets = []
    for fraction in ("0.7", "0.7", "1.0"):
        proc = subprocess.run([sys.executable, str(script), fraction], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        planned = json.loads(proc.stdout.strip().splitlines()[-1])
        assert len(planned) == 1, "the partitioner must run in every process"
        budgets.append(planned[0])
    assert budgets[0] == budgets[1] and budgets[2] > budgets[0]
