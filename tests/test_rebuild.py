"""Multi-rebuild (passes/rebuild.py, adacc_compiler/multi_rebuild.py) on small traced graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from adacc_compiler import multi_rebuild
from adacc_compiler.passes.classify import analyze_joint_graph
from adacc_compiler.passes.liveness import simulate
from adacc_compiler.passes.rebuild import (
    LAYER_SPAN,
    _fusible_kernel,
    backward_regions,
    rebuild_counts,
    rebuild_per_region,
)
from adacc_compiler.passes.recompute import check_partition, partition_with_plan
from adacc_compiler.solver import SolveResult
from tests.joint import trace_joint

_DEPTH = 6


def _stack(x, *ws):
    # Non-residual blocks: each layer's input is the previous layer's output,
    # so recomputing from the input rebuilds a chain through every layer.
    for w in ws:
        h = x @ w
        x = torch.sigmoid(h) * h + F.layer_norm(h, h.shape[-1:])
    return x.pow(2).mean()


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    ws = [torch.randn(32, 32, requires_grad=True) / 6 for _ in range(_DEPTH)]
    gm, _, kw = trace_joint(_stack, x, *ws, static=tuple(range(1, _DEPTH + 1)))
    info = analyze_joint_graph(
        gm, num_fwd_outputs=kw["num_fwd_outputs"], static_lifetime_input_indices=kw["static_lifetime_input_indices"]
    )
    return info, [x, *ws]


def _template() -> SolveResult:
    return SolveResult(
        save=set(), recompute=set(), keep_primals=set(), status="test", objective_s=0.0, bound_s=0.0, gap=0.0,
        time_s=0.0, num_columns=0, num_rows=0, num_nonzeros=0, shared_layers=0, warm_start=False, fallback=None,
        predicted_peak=0,
    )


def _saving_boundary(info) -> SolveResult:
    # Saves every boundary value it can: a thinning has checkpoints to drop.
    saved = {c for c in info.boundary if c in set(info.candidates) and isinstance(c.meta.get("val"), torch.Tensor)}
    keep = {p for p in info.boundary if p in set(info.primals) and p not in info.param_primals}
    return dataclasses.replace(_template(), save=saved, keep_primals=keep)


def _partition(info, plan):
    return partition_with_plan(info, save=plan.save, recompute=plan.recompute, keep_primals=plan.keep_primals)


def _gradients(fw_gm, bw_gm, inputs):
    outs = fw_gm(*inputs)
    saved = list(outs[1:])
    tangents = [torch.ones(())]
    return bw_gm(*saved, *tangents)


def test_layers_found(stack):
    info, _ = stack
    # The first and last blocks may fall outside the detected period; the rest are layers.
    assert info.num_layers >= _DEPTH - 2


def test_regions_follow_the_layers_and_the_span(stack):
    info, _ = stack
    plan = multi_rebuild.recompute_all(info, _template())
    _, bw_gm = _partition(info, plan)
    regions = backward_regions(info, bw_gm)
    order = [regions[n] for n in bw_gm.graph.nodes if n in regions]
    assert order == sorted(order), "regions are runs of the backward"
    assert len(set(order)) >= info.num_layers
    finer = backward_regions(info, bw_gm, span=3)
    assert len(set(finer.values())) > len(set(order))
    with pytest.raises(ValueError, match="span"):
        backward_regions(info, bw_gm, span=-1)


def test_recompute_all_needs_only_inputs(stack):
    info, _ = stack
    plan = multi_rebuild.recompute_all(info, _template())
    assert not plan.save  # nothing here draws random numbers
    assert {p.name for p in plan.keep_primals} == {info.primals[0].name}
    assert plan.recompute and plan.recompute <= set(info.candidates)


def test_rebuild_per_region_lowers_the_peak_and_keeps_the_gradients(stack):
    info, inputs = stack
    plan = multi_rebuild.recompute_all(info, _template())
    fw_gm, bw_gm = _partition(info, plan)
    single = simulate(info, fw_gm, bw_gm).peak
    expected = _gradients(fw_gm, bw_gm, inputs)

    fw_gm, bw_gm = _partition(info, plan)
    rebuilds = rebuild_per_region(info, bw_gm, span=LAYER_SPAN)
    rebuilt = simulate(info, fw_gm, bw_gm).peak
    # Rebuilt once the chain is held through the whole backward; per layer
    # only one layer's working set is live at a time.
    assert rebuilt < 0.5 * single, (rebuilt, single)
    assert rebuilds == rebuild_counts(info, bw_gm)
    # The first layer's values are rebuilt for every later layer's gradient.
    assert max(rebuilds.values()) >= _DEPTH - 1
    assert set(rebuilds) <= {n.name for n in plan.recompute}
    check_partition(info, fw_gm, bw_gm, save=plan.save, recompute=plan.recompute)
    got = _gradients(fw_gm, bw_gm, inputs)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Finer regions: more rebuilds, and no larger a peak.
    fw_gm, bw_gm = _partition(info, plan)
    finer = rebuild_per_region(info, bw_gm, span=3)
    assert sum(finer.values()) > sum(rebuilds.values())
    assert simulate(info, fw_gm, bw_gm).peak <= rebuilt


def test_search_picks_the_cheapest_plan_that_fits(stack):
    info, _ = stack
    template = _template()
    everything = multi_rebuild.recompute_all(info, template)
    costs = {c: 1e-6 for c in info.candidates}
    fw_gm, bw_gm = _partition(info, everything)
    single = simulate(info, fw_gm, bw_gm).peak

    def partition(plan):
        return _partition(info, plan)

    spans = multi_rebuild.SPANS
    best, smallest = multi_rebuild.search(
        info, [("recompute-all", everything, spans)], costs, budget=single // 2, partition=partition
    )
    assert best is not None and best.timeline.peak <= single // 2
    assert best.cost_s == pytest.approx(1e-6 * sum(best.rebuilds.values()))
    assert best.span == LAYER_SPAN  # the coarsest span that fits
    assert smallest.timeline.peak <= best.timeline.peak
    # A budget below every span's peak: nothing fits, and the smallest peak is reported.
    none, smallest = multi_rebuild.search(
        info, [("recompute-all", everything, spans)], costs, budget=1, partition=partition
    )
    assert none is None and smallest.timeline.peak > 1


def test_base_plan_is_not_mutated(stack):
    info, _ = stack
    plan = multi_rebuild.recompute_all(info, _template())
    def names(p):
        return [sorted(n.name for n in getattr(p, f)) for f in ("save", "recompute", "keep_primals")]

    before = names(plan)
    multi_rebuild.search(
        info, [("all", plan, multi_rebuild.SPANS)], {}, budget=10**9, partition=lambda p: _partition(info, p)
    )
    assert names(plan) == before
    # The joint graph keeps no copy: rewrites act on the partition only.
    assert not any("adacc_recompute_of" in n.meta for n in info.gm.graph.nodes)


def test_thinned_bases_keep_checkpoints_in_every_kth_layer_and_stay_closed(stack):
    info, _ = stack
    base = _saving_boundary(info)
    for every in (2, 3):
        plan = multi_rebuild.thinned(info, base, every)
        layers = {info.layer_of[n][0] for n in plan.save if n in info.layer_of}
        assert layers and all(layer % every == 0 for layer in layers)
        assert plan.save < base.save and plan.recompute
        _partition(info, plan)  # closed: partition_with_plan checks it
    with pytest.raises(ValueError, match="every"):
        multi_rebuild.thinned(info, base, 1)
    names = [name for name, _, _ in multi_rebuild.bases(info, base)]
    assert names[0] == "smallest-peak" and names[-1] == "recompute-all" and len(names) >= 3


def test_copies_on_a_checkpoint_are_ordered_after_the_previous_region(stack):
    # Inductor fuses kernels that read the same buffer when neither depends on
    # the other; each region's pointwise and reduction copies read checkpoints through a
    # where(s == s, x, x) on an element of a gradient the previous region returns.
    info, inputs = stack
    plan = multi_rebuild.thinned(info, _saving_boundary(info), 2)
    fw_gm, bw_gm = _partition(info, plan)
    expected = _gradients(fw_gm, bw_gm, inputs)
    rebuild_per_region(info, bw_gm)
    for a, b in zip(_gradients(fw_gm, bw_gm, inputs), expected):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    regions = backward_regions(info, bw_gm)
    wheres = [n for n in bw_gm.graph.nodes if n.target is torch.ops.aten.where.self]
    assert wheres
    order = {n: i for i, n in enumerate(bw_gm.graph.nodes)}
    for w in wheres:
        cond, a, b = w.args
        assert a is b and "adacc_recompute_of" not in a.meta
        source = cond.args[0]
        while source.target is torch.ops.aten.select.int:
            source = source.args[0]
        assert any(u.op == "output" for u in source.users)
        assert order[source] < order[w]
        readers = [u for u in w.users if "adacc_recompute_of" in u.meta]
        assert readers and all(_fusible_kernel(u) for u in readers)
    assert len(set(regions.values())) > 1
