"""Policy evolution: re-measure a plan's lossy codecs while training; re-plan when they drift.

A plan picks its lossy codecs on the values of the step it was compiled on,
and those values move as the model trains. On the README's main job the
cross-entropy's ``exp`` keeps 45.8 dB through ``int8_token`` at the first
step and 37-38 dB from step 50 on: the predictions sharpen, most
probabilities of a row fall below its quantisation step and round to zero
(1.9% of each row's mass, a bias the softmax gradient carries every step).
A plan made at step 0 would keep that error for the rest of the run.

:func:`adacc_compiler.backend.adacc_backend` therefore hands Dynamo an
:class:`EvolvingGraph` for every graph whose plan holds lossy codecs. It runs
the compiled graph and, on the calls of its schedule (the
``recheck_after``-th, then each time after twice as many calls as before,
at most :data:`MAX_INTERVAL` apart), first measures each lossy codec the plan
chose on that call's actual values (:class:`PlanMonitor`): the joint forward
runs once more eagerly, without gradients and with the RNG state restored,
and every codec's SQNR is taken exactly as at plan time, over the value's own
round trip and the values the backward rebuilds from it
(:func:`adacc_compiler.passes.compress.measure_menus`).

When a codec falls more than ``recheck_tolerance_db`` below ``min_sqnr_db``,
or the plan's combined SQNR more than that below ``min_plan_sqnr_db``, or a
compressed value holds inf or NaN, the graph is planned and compiled again
from the same Dynamo graph on that call's inputs: a new plan on the current
values (other codecs, or recompute where none passes any more), verified and
dumped like the first, with the reason in its notes. That call and all after
it run the new plan. The tolerance absorbs the spread between batches: one
codec measured on successive batches of a trained model moves by about half
a dB. Every check is logged (INFO when it re-plans, DEBUG otherwise) and kept
on the plan's :class:`~adacc_compiler.backend.CompiledGraph` record.

A check costs one eager forward of the graph and the chosen codecs' round
trips, run before the call while none of its activations exist, each value
freed after its last reader; the doubling schedule keeps checks to about
``log2(calls)``. A re-plan
costs a solve and an Inductor compile, paid once per drift.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.fx as fx

from adacc_compiler.plan import combined_sqnr_db

log = logging.getLogger(__name__)

__all__ = ["MAX_INTERVAL", "CodecCheck", "PlanMonitor", "EvolvingGraph"]

#: The longest a check waits for the next, in calls.
MAX_INTERVAL = 1024


@dataclass(frozen=True)
class CodecCheck:
    """One measurement of a plan's lossy codecs on one call's values."""

    call: int  # 1-based count of calls of the compiled graph
    sqnr_db: dict[str, float]  # compressed value's name -> its codec's SQNR now, in dB
    plan_sqnr_db: float  # the plan's combined SQNR now
    drift: tuple[str, ...]  # why the plan no longer holds (empty: it holds)
    seconds: float  # time the measurement took


@dataclass
class PlanMonitor:
    """What a check needs of a plan: its joint graph and the lossy codec of each value it compresses."""

    info: Any  # JointGraphInfo of the planned joint graph
    codecs: dict[fx.Node, str]  # compressed value -> its lossy codec
    checkpoints: frozenset[fx.Node]  # those the backward does not read (recompute sources)
    planned_sqnr_db: dict[fx.Node, float]  # each codec's SQNR at plan time
    min_sqnr_db: float
    min_plan_sqnr_db: float | None
    tolerance_db: float
    stochastic: bool
    checks: list[CodecCheck] = field(default_factory=list)

    def check(self, inputs: Sequence[object], *, call: int) -> CodecCheck | None:
        """Measure every codec on ``inputs``; None when they do not fit the graph (nothing measured)."""
        from adacc_compiler.passes.compress import Menu, measure_menus

        t0 = time.perf_counter()
        menus = {
            n: Menu(role="", rule="recheck", codecs=[c], checkpoint=n in self.checkpoints) for n, c in self.codecs.items()
        }
        note = measure_menus(self.info, menus, inputs, min_sqnr_db=-math.inf, stochastic=self.stochastic)
        if note is not None:
            log.warning("adacc: codec check at call %d skipped: %s", call, note)
            return None
        # A value holding inf or NaN gets no SQNR (its lossy codecs are excluded).
        sqnr = {n: menus[n].sqnr_db.get(c, -math.inf) for n, c in self.codecs.items()}
        plan_db = combined_sqnr_db(sqnr.values())
        drift = []
        for n, db in sqnr.items():
            if db == -math.inf:
                drift.append(f"{n.name} ({self.codecs[n]}): the value or its round trip holds inf or NaN")
            elif db < self.min_sqnr_db - self.tolerance_db:
                drift.append(
                    f"{n.name} ({self.codecs[n]}) at {db:.1f} dB, below min_sqnr_db {self.min_sqnr_db:g} "
                    f"(planned at {self.planned_sqnr_db[n]:.1f} dB)"
                )
        if (
            self.min_plan_sqnr_db is not None
            and math.isfinite(plan_db)
            and plan_db < self.min_plan_sqnr_db - self.tolerance_db
        ):
            worst = sorted(sqnr, key=lambda n: sqnr[n])[:3]
            drift.append(
                f"plan SQNR {plan_db:.1f} dB, below min_plan_sqnr_db {self.min_plan_sqnr_db:g} (lowest: "
                + ", ".join(
                    f"{n.name} {self.codecs[n]} {sqnr[n]:.1f} dB, planned {self.planned_sqnr_db[n]:.1f}" for n in worst
                )
                + ")"
            )
        result = CodecCheck(
            call=call,
            sqnr_db={n.name: db for n, db in sqnr.items()},
            plan_sqnr_db=plan_db,
            drift=tuple(drift),
            seconds=time.perf_counter() - t0,
        )
        self.checks.append(result)
        return result


class EvolvingGraph:
    """The callable adacc hands Dynamo for a graph whose plan holds lossy codecs (see the module docstring).

    ``compile`` plans and compiles the graph on the given inputs and returns
    the compiled callable with its :class:`~adacc_compiler.backend.CompiledGraph`
    record (None when nothing was planned); ``reason`` goes into the new
    plan's notes.
    """

    def __init__(
        self,
        compiled: Callable[..., Any],
        record: Any,
        compile: Callable[[list[object], str], tuple[Callable[..., Any], Any]],
        *,
        first_check: int,
    ) -> None:
        if first_check < 1:
            raise ValueError(f"recheck_after: expected a positive number of calls, got {first_check}")
        self.compiled = compiled
        self.record = record
        self._compile = compile
        self.calls = 0
        self._interval = first_check
        self._next_check = first_check

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self._next_check:
            self._interval = min(2 * self._interval, MAX_INTERVAL)
            self._next_check = self.calls + self._interval
            self._check(args)
        return self.compiled(*args)

    def _check(self, args: Sequence[object]) -> None:
        monitor = self.record.monitor if self.record is not None else None
        if monitor is None:
            return
        result = monitor.check(args, call=self.calls)
        if result is None:
            return
        graph_id = self.record.graph_id
        if not result.drift:
            log.debug(
                "adacc %s: codecs checked at call %d: plan SQNR %.1f dB, all within bounds (%.0f ms)",
                graph_id, self.calls, result.plan_sqnr_db, 1e3 * result.seconds,
            )
            return
        reason = f"re-plan of {graph_id} at call {self.calls}, its codecs drifted: " + "; ".join(result.drift)
        from adacc_compiler.solver import InfeasibleBudgetError

        t0 = time.perf_counter()
        try:
            compiled, record = self._compile(list(args), reason)
        except InfeasibleBudgetError as err:
            raise InfeasibleBudgetError(
                f"adacc {graph_id}: at call {self.calls} its lossy codecs no longer meet their bounds on the "
                f"current values ({'; '.join(result.drift)}), and no plan on those values fits: {err}. "
                "Raise memory_budget, lower min_sqnr_db / min_plan_sqnr_db, or pass recheck_after=None "
                "to keep the first plan.",
                min_feasible_bytes=err.min_feasible_bytes,
                budget_bytes=err.budget_bytes,
            ) from err
        if record is not None:
            record.replaces = graph_id
        self.compiled, self.record = compiled, record
        log.info(
            "adacc %s: codecs drifted at call %d (%s); re-planned as %s in %.1f s",
            graph_id, self.calls, "; ".join(result.drift), record.graph_id if record else "?", time.perf_counter() - t0,
        )
