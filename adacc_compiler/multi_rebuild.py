"""Plans for budgets no single-rebuild plan meets: rebuild values again per backward region.

The MILP (:mod:`adacc_compiler.solver`) rebuilds each recomputed value once.
When even its smallest-peak plan overflows the budget, the backend asks
:func:`search` for a multi-rebuild plan: a base plan (what to save and what
to recompute) whose backward is rewritten by
:func:`adacc_compiler.passes.rebuild.rebuild_per_region` so that each region
rebuilds what it reads (see that module for the memory argument).

The bases (:func:`bases`) run from the solver's smallest-peak plan, which
keeps its checkpoints and so rebuilds little, through that plan with its
checkpoints kept only in every 2nd, 3rd, 4th or 6th layer, to the plan that
recomputes every value it can from the inputs, which saves nothing a rebuild
could replace. Each is rewritten with one region per layer first and, for
the first and last, then with finer regions; the exact simulation judges
each, and the cheapest rewrite that fits is chosen (its time is the summed
cost of every rebuilt op, each counted once per region that runs it). A
finer region only adds rebuilds, so a base stops at its first span that
fits. When nothing fits, the smallest simulated peak seen is what the budget
error states.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from adacc_compiler.passes.classify import JointGraphInfo
from adacc_compiler.passes.liveness import simulate
from adacc_compiler.passes.rebuild import LAYER_SPAN, rebuild_per_region
from adacc_compiler.plan import MemoryTimeline

log = logging.getLogger(__name__)

__all__ = ["RebuildPlan", "search", "bases", "recompute_all", "thinned", "SPANS", "THINNING"]

# Region spans tried per base, coarsest first (LAYER_SPAN: a region per layer).
SPANS = (LAYER_SPAN, 100, 50, 25, 10)


@dataclass
class RebuildPlan:
    base: object  # the SolveResult whose save / recompute sets were rewritten
    base_name: str
    span: int
    rebuilds: dict[str, int]  # forward value -> times the backward computes it
    cost_s: float
    fw_gm: fx.GraphModule
    bw_gm: fx.GraphModule
    timeline: MemoryTimeline

    def describe(self) -> str:
        regions = "one region per layer" if self.span == LAYER_SPAN else f"regions of at most {self.span} nodes"
        again = sum(max(0, k - 1) for k in self.rebuilds.values())
        return (
            f"multi-rebuild plan ({self.base_name} base, {regions}): {again} extra rebuilds "
            f"of {sum(1 for k in self.rebuilds.values() if k > 1)} values"
        )


def _closed(info: JointGraphInfo, template, *, save: set, recompute: set, keep: set, compress: dict, pending):
    """``template`` with ``pending`` values recomputed, and whatever they read made available.

    An input that is neither saved, recomputed, compressed nor kept is
    recomputed in turn, or saved where it cannot be (random draws, for
    instance); inputs that are not parameters are kept.
    """
    params = set(info.param_primals)
    primals = set(info.primals)
    candidates = set(info.candidates)
    stack = list(pending)
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in primals:
            if node not in params and isinstance(node.meta.get("val"), torch.Tensor):
                keep.add(node)
            continue
        if node not in candidates or node in save or node in compress:
            continue
        if node in info.not_recomputable:
            save.add(node)
            continue
        recompute.add(node)
        stack.extend(node.all_input_nodes)
    return dataclasses.replace(template, save=save, recompute=recompute, keep_primals=keep, compress=compress)


def recompute_all(info: JointGraphInfo, template):
    """``template`` (a SolveResult) with every recomputable value the backward needs recomputed.

    Values that cannot be recomputed (random draws, for instance) are saved
    where the backward or a recomputed value reads them; inputs that are not
    parameters are kept.
    """
    return _closed(info, template, save=set(), recompute=set(), keep=set(), compress={}, pending=info.boundary)


def thinned(info: JointGraphInfo, base, every: int):
    """``base`` keeping its saved values only in every ``every``-th layer; the others are recomputed.

    Fewer checkpoints: a lower peak once each region rebuilds what it reads,
    for longer rebuild chains. Values outside the repeated layers, and those
    that cannot be recomputed, stay saved.
    """
    if every < 2:
        raise ValueError(f"every must be at least 2, got {every}")
    dropped = {
        n for n in base.save
        if n not in info.not_recomputable and n in info.layer_of and info.layer_of[n][0] % every
    }
    return _closed(
        info, base, save=set(base.save) - dropped, recompute=set(base.recompute), keep=set(base.keep_primals),
        compress=dict(base.compress), pending=dropped,
    )


# Thinned bases tried between the smallest-peak plan and recompute-all.
THINNING = (2, 3, 4, 6)


def bases(info: JointGraphInfo, smallest_peak) -> list[tuple[str, object, tuple[int, ...]]]:
    """The base plans :func:`search` tries, each with its region spans, roughly cheapest first.

    The smallest-peak plan and recompute-all get every span; the thinned ones
    (its checkpoints kept in every 2nd, 3rd, ... layer) one region per layer,
    which is where thinning pays: on a deep chain (the test MLP) the working
    set of a layer is small and the checkpoints are the peak.
    """
    out = [("smallest-peak", smallest_peak, SPANS)]
    seen = {frozenset(smallest_peak.save)}
    for every in THINNING:
        plan = thinned(info, smallest_peak, every)
        key = frozenset(plan.save)
        if key not in seen:
            seen.add(key)
            out.append((f"smallest-peak, checkpoints in 1 of {every} layers", plan, (LAYER_SPAN,)))
    out.append(("recompute-all", recompute_all(info, smallest_peak), SPANS))
    return out


def search(
    info: JointGraphInfo,
    bases: list[tuple[str, object, tuple[int, ...]]],
    costs: dict[fx.Node, float],
    *,
    budget: int,
    partition: Callable[[object], tuple[fx.GraphModule, fx.GraphModule]],
) -> tuple[RebuildPlan | None, RebuildPlan | None]:
    """``(cheapest plan that fits the budget or None, smallest-peak plan seen)``.

    ``bases`` are ``(name, plan, spans)``, the spans tried coarsest first.
    """
    by_name = {n.name: n for n in info.fw_nodes}
    best: RebuildPlan | None = None
    smallest: RebuildPlan | None = None
    for base_name, base, spans in bases:
        for span in spans:
            fw_gm, bw_gm = partition(base)
            rebuilds = rebuild_per_region(info, bw_gm, span=span)
            timeline = simulate(info, fw_gm, bw_gm)
            cost = sum(costs.get(by_name[name], 0.0) * k for name, k in rebuilds.items() if name in by_name)
            found = RebuildPlan(base, base_name, span, rebuilds, cost, fw_gm, bw_gm, timeline)
            log.debug(
                "multi-rebuild: %s base, span %s: peak %d (budget %d), est. %.1f us",
                base_name, span, timeline.peak, budget, cost * 1e6,
            )
            if smallest is None or timeline.peak < smallest.timeline.peak:
                smallest = found
            if timeline.peak <= budget:
                if best is None or cost < best.cost_s:
                    best = found
                break
            if best is not None and cost >= best.cost_s:
                break  # finer spans of this base only cost more
    return best, smallest
