"""Shared end-to-end checks: compile with adacc, compare with eager, measure memory."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable

import torch

import adacc_compiler
from adacc_compiler.measure import grad_relative_error, saved_activation_bytes
from adacc_compiler.plan import Plan


@dataclass
class E2EResult:
    plan: Plan
    grad_error: float
    measured_saved: int
    budget_bytes: int
    worst_param_error: float = 0.0  # the largest per-parameter relative gradient error


def _infeasible_minimum(err: BaseException) -> int | None:
    match = re.search(r"smallest budget adacc finds feasible for this graph is (\d+) bytes", str(err))
    return int(match.group(1)) if match else None


def run_adacc(
    make_model: Callable[[], torch.nn.Module],
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    budget: float | int,
    **options,
) -> E2EResult:
    """One training step with adacc at ``budget`` against eager, on identical weights.

    A fractional budget that the graph cannot meet must raise an error stating
    the smallest feasible budget; that budget is then compiled and checked
    instead, so the assertions below always run on a real plan.
    """
    torch.manual_seed(0)
    reference = make_model()
    model = copy.deepcopy(reference)
    loss_fn(reference).backward()

    # Lossless unless a test asks otherwise: the gradient checks below are exact.
    options = {"profile": False, "compress": "lossless", **options}
    before = len(adacc_compiler.compiled_graphs())
    compiled = torch.compile(model, backend="adacc", options={"memory_budget": budget, **options})
    try:
        loss_fn(compiled).backward()
    except Exception as err:  # noqa: BLE001 - re-raised unless it is the documented infeasibility
        smallest = _infeasible_minimum(err)
        if smallest is None or not isinstance(budget, float):
            raise
        torch._dynamo.reset()
        model = copy.deepcopy(reference)
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model, backend="adacc", options={"memory_budget": smallest, **options})
        loss_fn(compiled).backward()
    graphs = adacc_compiler.compiled_graphs()[before:]
    assert len(graphs) == 1, f"expected one compiled graph, got {len(graphs)}"
    plan = graphs[0].plan
    error = grad_relative_error(reference, model)
    worst = _worst_param_error(reference, model)
    params = list(model.parameters()) + list(model.buffers())
    measured = saved_activation_bytes(lambda: loss_fn(compiled), exclude=params)
    return E2EResult(
        plan=plan, grad_error=error, measured_saved=measured, budget_bytes=plan.budget_bytes, worst_param_error=worst
    )


def _worst_param_error(reference: torch.nn.Module, model: torch.nn.Module) -> float:
    """max over parameters of ``||g - g_ref|| / ||g_ref||``: a broken codec on one
    tensor hides in the global norm but not here."""
    worst = 0.0
    other = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.grad is None or p.grad.norm() == 0:
            continue
        q = other[name].grad
        err = float((q.double() - p.grad.double()).norm() / p.grad.double().norm()) if q is not None else 1.0
        worst = max(worst, err)
    return worst


def check(result: E2EResult, *, grad_rtol: float = 1e-5) -> None:
    """The acceptance checks shared by every end-to-end test.

    ``grad_rtol`` is the gradient error allowed against eager: 1e-5 for
    lossless plans, the codecs' expected error for lossy ones.
    """
    assert result.grad_error <= grad_rtol, result.grad_error
    if grad_rtol > 1e-5:
        # Lossy plans: every parameter's gradient, not only their joint norm
        # (a codec that decodes garbage on one tensor hides in the norm).
        assert result.worst_param_error <= 10 * grad_rtol, result.worst_param_error
    # Measured saved bytes at or under the budget (2% allowance) ...
    assert result.measured_saved <= 1.02 * result.budget_bytes, (result.measured_saved, result.budget_bytes)
    # ... and the liveness prediction within 5% of the measurement.
    predicted = result.plan.predicted_saved_bytes
    assert abs(predicted - result.measured_saved) <= 0.05 * result.measured_saved, (predicted, result.measured_saved)
    assert result.plan.predicted_peak_bytes <= result.budget_bytes
