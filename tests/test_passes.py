"""The joint-graph passes and the MILP on small traced graphs (no Inductor)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adacc_compiler import solver as S
from adacc_compiler.backend import stock_partition
from adacc_compiler.passes.classify import analyze_joint_graph
from adacc_compiler.passes.liveness import model_intervals, saved_names, simulate
from adacc_compiler.passes.recompute import PlanMismatchError, check_partition, partition_with_plan
from tests.joint import trace_joint


def _mlp(x, w1, w2, w3):
    h = F.gelu(x @ w1)
    h = torch.relu(h @ w2)
    return (h @ w3).pow(2).sum()


def _blocks(x, *ws):
    # A residual stack of identical blocks: the layer detector must find them.
    for w1, w2 in zip(ws[::2], ws[1::2]):
        h = F.layer_norm(x, x.shape[-1:])
        x = x + torch.tanh(h @ w1) @ w2
    return x.pow(2).mean()


def _dropout(x, w):
    return F.dropout(torch.relu(x @ w), p=0.5, training=True).sum()


@pytest.fixture(scope="module")
def mlp_graph():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    ws = [torch.randn(64, 128, requires_grad=True), torch.randn(128, 128, requires_grad=True),
          torch.randn(128, 16, requires_grad=True)]
    return trace_joint(_mlp, x, *ws, static=(1, 2, 3))


@pytest.fixture(scope="module")
def blocks_graph():
    torch.manual_seed(0)
    x = torch.randn(16, 32, requires_grad=False)
    ws = []
    for _ in range(6):
        ws += [torch.randn(32, 64, requires_grad=True) / 8, torch.randn(64, 32, requires_grad=True) / 8]
    return trace_joint(_blocks, x, *ws, static=tuple(range(1, 13)))


def _info(graph):
    gm, _, kw = graph
    return analyze_joint_graph(gm, num_fwd_outputs=kw["num_fwd_outputs"],
                               static_lifetime_input_indices=kw["static_lifetime_input_indices"])


def _unit_costs(info):
    # Roofline costs: deterministic, and views are free as in real plans.
    from adacc_compiler.costs import CostModel

    return CostModel(profile=False, cache_dir=None).node_costs(
        [c for c in info.candidates if c not in info.not_recomputable]
    )


def test_classify_mlp(mlp_graph):
    info = _info(mlp_graph)
    names = {n.name for n in info.boundary}
    # GELU's backward reads its input (the first matmul's output).
    assert "mm" in names
    # The boundary is exactly the forward values that backward nodes read.
    read = {a for b in info.bw_nodes for a in b.all_input_nodes if a in set(info.fw_nodes) or a in info.primals}
    assert read <= set(info.boundary)
    assert all(not n.name.startswith("tangents") for n in info.fw_nodes)
    assert set(info.fw_nodes).isdisjoint(info.bw_nodes)
    # Each candidate is upstream of the boundary, and weights are never activations.
    assert {p.name for p in info.param_primals} == {"primals_2", "primals_3", "primals_4"}
    assert all(info.nbytes[p] == 0 for p in info.param_primals)
    assert all(info.nbytes[p] > 0 for p in info.primals if p not in info.param_primals)


def test_random_ops_are_not_recomputable():
    torch.manual_seed(0)
    gm, _, kw = trace_joint(_dropout, torch.randn(8, 16), torch.randn(16, 16, requires_grad=True), static=(1,))
    info = analyze_joint_graph(gm, num_fwd_outputs=kw["num_fwd_outputs"], static_lifetime_input_indices=[1])
    random = [n for n, why in info.not_recomputable.items() if why == "random op"]
    assert random, "the dropout draw must be marked not recomputable"


def test_layers_are_detected_by_structure(blocks_graph):
    info = _info(blocks_graph)
    assert info.num_layers >= 5  # six identical blocks (the first may differ at its edges)
    slots = {}
    for node, (layer, slot) in info.layer_of.items():
        slots.setdefault(slot, set()).add(str(node.target))
    # Every slot holds the same op in every layer.
    assert all(len(ops) == 1 for ops in slots.values())


def _silu_blocks(x, *ws):
    for w1, w2 in zip(ws[::2], ws[1::2]):
        x = x + F.silu(F.layer_norm(x, x.shape[-1:]) @ w1) @ w2
    return x.pow(2).mean()


def test_backward_side_forward_values_join_their_layer():
    """SiLU's backward computes sigmoid(x) from the forward's x: the value is a
    candidate outside the forward's repeated stretch, and must share its
    layer's decisions like the forward values around it."""
    torch.manual_seed(0)
    ws = []
    for _ in range(6):
        ws += [torch.randn(32, 64, requires_grad=True) / 8, torch.randn(64, 32, requires_grad=True) / 8]
    graph = trace_joint(_silu_blocks, torch.randn(16, 32), *ws, static=tuple(range(1, 13)), inductor_decomps=True)
    info = _info(graph)
    forward = set(info.node_info._required_fw_nodes)
    sigmoids = [c for c in info.candidates if c not in forward and "sigmoid" in str(c.target)]
    assert len(sigmoids) >= info.num_layers
    placed = [info.layer_of[c] for c in sigmoids if c in info.layer_of]
    assert len({layer for layer, _ in placed}) == info.num_layers  # one per detected layer
    assert len({slot for _, slot in placed}) == 1 and placed[0][1] >= info.layer_period
    model = S._Model(info, model_intervals(info, window=S._window(info)), _unit_costs(info), True)
    by_layer = {info.layer_of[c][0]: c for c in sigmoids if c in info.layer_of}
    twin = by_layer[1]
    for layer in range(2, info.num_layers - 1):
        assert model.rec_col[by_layer[layer]] == model.rec_col[twin]
        assert model.save_col.get(by_layer[layer]) == model.save_col.get(twin)
    assert model.rec_col[by_layer[0]] != model.rec_col[twin]


def _stock(graph):
    """Stock Inductor's split of a traced joint graph, and its exact timeline."""
    gm, inp, kw = graph
    fw, bw = stock_partition(gm, inp, num_fwd_outputs=kw["num_fwd_outputs"],
                             static_lifetime_input_indices=kw["static_lifetime_input_indices"])
    return fw, bw, simulate(_info(graph), fw, bw)


def test_stock_simulation_counts_saved_storages(mlp_graph):
    info = _info(mlp_graph)
    fw, bw, tl = _stock(mlp_graph)
    by_name = {n.name: n for n in fw.graph.nodes}
    expected = 0
    seen = set()
    for name in saved_names(bw):
        if name in info.param_primal_names:
            continue
        val = by_name[name].meta["val"]
        key = id(val.untyped_storage())
        if key not in seen:
            seen.add(key)
            expected += val.untyped_storage().nbytes()
    assert tl.saved_bytes == expected > 0
    assert tl.peak >= tl.saved_bytes
    assert tl.phases[0] == "forward" and tl.phases[-1] == "backward"


def _plan_and_simulate(graph, budget, share=True):
    gm, _, kw = graph
    info = _info(graph)
    res = S.solve_plan(info, _unit_costs(info), budget_bytes=budget, time_limit=10, mip_gap=0.0,
                       share_layers=share)
    fw, bw = partition_with_plan(info, save=res.save, recompute=res.recompute, keep_primals=res.keep_primals)
    return info, res, fw, bw, simulate(info, fw, bw)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("fraction", [1.0, 0.8, 0.6, 0.45])
def test_plans_fit_and_match_the_exact_simulation(blocks_graph, fraction, share):
    _, _, stock = _stock(blocks_graph)
    budget = int(fraction * stock.peak)
    info, res, fw, bw, tl = _plan_and_simulate(blocks_graph, budget, share)
    # The plan's own model and the exact simulation of its partition agree...
    assert abs(res.predicted_peak - tl.peak) <= 0.05 * tl.peak
    # ...and the simulated peak respects the budget.
    assert tl.peak <= budget
    assert res.status == "Optimal"
    if fraction < 1.0:
        assert res.recompute, "a budget below stock must recompute something"


def test_infeasible_budget_states_the_smallest_feasible(blocks_graph):
    info = _info(blocks_graph)
    with pytest.raises(S.InfeasibleBudgetError) as err:
        S.solve_plan(info, _unit_costs(info), budget_bytes=1000, time_limit=10, mip_gap=0.0, share_layers=False)
    smallest = err.value.min_feasible_bytes
    assert smallest > 1000 and str(smallest) in str(err.value)
    # The stated minimum is feasible.
    res = S.solve_plan(info, _unit_costs(info), budget_bytes=smallest, time_limit=10, mip_gap=0.0,
                       share_layers=False)
    assert res.predicted_peak <= smallest
    _, res, fw, bw, tl = _plan_and_simulate(blocks_graph, smallest, share=False)
    assert tl.peak <= smallest * 1.02


def test_shared_layers_share_decisions(blocks_graph):
    info = _info(blocks_graph)
    iv = model_intervals(info, window=S._window(info))
    shared = S._Model(info, iv, _unit_costs(info), True)
    alone = S._Model(info, iv, _unit_costs(info), False)
    assert shared.shared_layers == info.num_layers - 2
    assert shared.num_cols < alone.num_cols


def test_more_budget_never_costs_more_time(blocks_graph):
    info = _info(blocks_graph)
    costs = _unit_costs(info)
    with pytest.raises(S.InfeasibleBudgetError) as err:
        S.solve_plan(info, costs, budget_bytes=1000, time_limit=10, mip_gap=0.0, share_layers=False)
    floor = err.value.min_feasible_bytes
    objectives = []
    for scale in (1.0, 1.3, 1.8, 3.0):
        res = S.solve_plan(info, costs, budget_bytes=int(floor * scale), time_limit=10, mip_gap=0.0,
                           share_layers=False)
        objectives.append(res.objective_s)
    assert all(a >= b - 1e-12 for a, b in zip(objectives, objectives[1:]))
    assert objectives[0] > objectives[-1]


def test_greedy_warm_start_is_feasible(blocks_graph):
    info = _info(blocks_graph)
    iv = model_intervals(info, window=S._window(info))
    m = S._Model(info, iv, _unit_costs(info), False)
    retain_all = m.model_peak(S._greedy(m, math.inf))
    x = S._greedy(m, 0.7 * retain_all)
    assert x is not None and m.logical_ok(x)
    assert m.model_peak(x) < retain_all


def test_greedy_starts_from_stock_and_checkpoints_layers():
    pytest.importorskip("transformers")
    from adacc_compiler.passes.liveness import partition_choices
    from tests.joint import capture_joint_graphs
    from tests.models import hf_llama

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    ((gm, inputs, kw),) = capture_joint_graphs(lambda m: m(input_ids=ids, labels=ids).loss, hf_llama(6))
    graph = (gm, inputs, kw)
    info = _info(graph)
    fw, bw, stock = _stock(graph)
    iv = model_intervals(info, window=S._window(info))
    m = S._Model(info, iv, _unit_costs(info), False)
    seed = partition_choices(info, bw)
    x = S._seeded(m, seed)
    # Stock's own plan, in the model's columns, has the simulated stock peak.
    assert x is not None and m.logical_ok(x)
    assert m.model_peak(x) == pytest.approx(stock.peak, rel=0.02)
    # Checkpointing whole layers brings it under a budget well below stock.
    budget = 0.6 * stock.peak
    x = S._greedy(m, budget, seed)
    assert x is not None and m.logical_ok(x)
    assert m.model_peak(x) <= budget
    _, recompute, _, _ = m.decisions(x)
    layers = {info.layer_of[c][0] for c in recompute if c in info.layer_of}
    assert layers, "no layer was checkpointed"


def test_refit_changes_a_plan_only_where_it_overflows(blocks_graph):
    """The warm start of a later round: an earlier plan moved under a lower target by a local MILP."""
    info = _info(blocks_graph)
    iv = model_intervals(info, window=S._window(info))
    m = S._Model(info, iv, _unit_costs(info), False)
    retain_all = m.model_peak(S._greedy(m, math.inf))
    first = S.solve_plan(info, _unit_costs(info), budget_bytes=int(0.8 * retain_all), time_limit=10, mip_gap=0.0,
                         share_layers=False)
    x = m.vector(first.save, first.recompute, first.keep_primals, first.compress)
    profile = m.memory_profile(x)
    target = 0.97 * profile.max()
    y = S._refit(m, x.copy(), target)
    assert y is not None and m.logical_ok(y)
    assert m.model_peak(y) <= target
    # Columns whose memory misses every point over the target keep their value.
    over = np.flatnonzero(profile > target)
    touched = {col for col, _, a, b in m.mem_terms if any(a <= k <= b for k in over)}
    untouched = [k for k in range(m.num_cols) if all(col not in touched for col in _value_cols(m, k))]
    assert untouched, "the overflow covers every value: the test shows nothing"
    assert all(x[k] == y[k] for k in untouched if k not in m.pull_cols)
    # A plan that already fits is returned as it is.
    assert S._refit(m, x.copy(), profile.max()) is not None


def test_peak_rows_restate_the_memory_model(blocks_graph):
    """The explicit budget rows hold what the running total holds, so they cut no plan off."""
    import highspy

    info = _info(blocks_graph)
    iv = model_intervals(info, window=S._window(info))
    m = S._Model(info, iv, _unit_costs(info), False)
    retain_all = m.model_peak(S._greedy(m, math.inf))
    budget = 0.6 * retain_all
    # Every point's row, on random closed plans, sums to the memory profile there.
    rows = S._point_rows(m, np.arange(len(m.points)))
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = np.zeros(m.num_cols)
        for c in info.boundary:
            ways = m.ways(c)
            x[ways[rng.integers(len(ways))]] = 1
        for k in m.keep_col.values():
            x[k] = 1
        assert S._close(m, x)
        profile = m.memory_profile(x)
        assert [sum(v * x[c] for c, v in rows[k].items()) for k in range(len(m.points))] == pytest.approx(profile)

    def optimum(with_rows):
        h, _, _, _ = S._build_highs(m, budget, minimise_peak=False)
        h.setOptionValue("presolve", "off")
        h.setOptionValue("mip_rel_gap", 0.0)
        added = S._add_peak_rows(h, m, budget) if with_rows else 0
        h.run()
        assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
        return h.getInfo().objective_function_value, added

    plain, _ = optimum(False)
    spelled, added = optimum(True)
    assert added > 0, "the LP relaxation is nowhere at the budget: the test shows nothing"
    assert spelled == pytest.approx(plain, rel=1e-9)


def _value_cols(m, k):
    """Every decision column of the value that column ``k`` belongs to."""
    return next((m.ways(c) for c in m.relevant if k in m.ways(c)), [k])


def test_repaired_plan_drops_banned_recompute_pairs(blocks_graph):
    info = _info(blocks_graph)
    costs = _unit_costs(info)
    iv = model_intervals(info, window=S._window(info))
    m = S._Model(info, iv, costs, False)
    retain_all = m.model_peak(S._greedy(m, math.inf))
    plan = S.solve_plan(info, costs, budget_bytes=int(0.6 * retain_all), time_limit=10, mip_gap=0.0,
                        share_layers=False)
    pairs = [(c, u) for c in plan.recompute for u in c.users if u in plan.recompute and c in m.save_col]
    assert pairs, "the plan recomputes no chain: the test shows nothing"
    banned = S._Model(info, iv, costs, False, banned_pairs=pairs[:1])
    x = S._repaired(banned, plan)
    assert x is not None and banned.logical_ok(x)
    c, u = pairs[0]
    assert not (x[banned.rec_col[c]] > 0.5 and x[banned.rec_col[u]] > 0.5)
    assert x[banned.save_col[c]] == 1


def test_partition_check_rejects_a_deviating_split(mlp_graph):
    info = _info(mlp_graph)
    res = S.solve_plan(info, _unit_costs(info), budget_bytes=10**9, time_limit=10, mip_gap=0.0, share_layers=False)
    fw, bw = partition_with_plan(info, save=res.save, recompute=res.recompute, keep_primals=res.keep_primals)
    check_partition(info, fw, bw, save=res.save, recompute=res.recompute)
    # Claim that nothing was saved: the real split contradicts it.
    if res.save:
        with pytest.raises(PlanMismatchError):
            check_partition(info, fw, bw, save=set(), recompute=res.recompute)


def test_model_never_underestimates_random_closed_plans(blocks_graph):
    """Random feasible plans: the interval model is never below the exact simulation.

    Views are recomputed, as every real plan does (they cost nothing). For
    arbitrary plans the model may over-count (a value kept alive for a user
    that is rebuilt elsewhere); plans the solver picks are checked for
    closeness in test_plans_fit_and_match_the_exact_simulation.
    """
    from adacc_compiler.passes.liveness import is_alias

    info = _info(blocks_graph)
    rng = np.random.default_rng(0)
    iv0 = model_intervals(info, window=S._window(info))
    m0 = S._Model(info, iv0, _unit_costs(info), False)
    for _ in range(5):
        x = np.zeros(m0.num_cols)
        for c in info.boundary:
            if c in m0.rec_col and is_alias(c):
                x[m0.rec_col[c]] = 1
            elif c in m0.save_col and (c not in m0.rec_col or rng.random() < 0.5):
                x[m0.save_col[c]] = 1
            elif c in m0.rec_col:
                x[m0.rec_col[c]] = 1
        for p, k in m0.keep_col.items():
            x[k] = 1
        assert S._close(m0, x)
        save = {c for c, k in m0.save_col.items() if x[k] > 0.5}
        rec = {c for c, k in m0.rec_col.items() if x[k] > 0.5}
        keep = {p for p, k in m0.keep_col.items() if x[k] > 0.5}
        own = S._Model(info, model_intervals(info, rec), _unit_costs(info), False)
        predicted = own.model_peak(own.vector(save, rec, keep))
        fw, bw = partition_with_plan(info, save=save, recompute=rec, keep_primals=keep)
        tl = simulate(info, fw, bw)
        assert predicted >= 0.98 * tl.peak


def test_unclosed_plan_is_rejected(mlp_graph):
    """Recomputing a value whose inputs are neither saved nor recomputed is an error."""
    from adacc_compiler.passes.recompute import check_closed

    info = _info(mlp_graph)
    res = S.solve_plan(info, _unit_costs(info), budget_bytes=10**9, time_limit=10, mip_gap=0.0, share_layers=False)
    check_closed(info, save=res.save, recompute=res.recompute, keep_primals=res.keep_primals)
    # Recompute the GELU input from nothing: its matmul input is no longer available.
    gelu_input = next(n for n in info.boundary if n.name == "mm")
    with pytest.raises(PlanMismatchError, match="unavailable"):
        check_closed(info, save=res.save - {gelu_input}, recompute={gelu_input}, keep_primals=set())


def _loss_head(x, w):
    # A float32 cross-entropy-like chain over a wide output, as in a language
    # model's loss: Inductor fuses the pointwise steps into a few kernels.
    logits = (x @ w).float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return (shifted - shifted.exp().sum(dim=-1, keepdim=True).log()).mean()


def test_fused_pointwise_values_hold_no_memory_when_recomputed():
    from adacc_compiler.passes.liveness import fuses_into_users

    torch.manual_seed(0)
    graph = trace_joint(_loss_head, torch.randn(8, 16), torch.randn(16, 512, requires_grad=True), static=(1,))
    info = _info(graph)
    by_target = {}
    for n in info.fw_nodes:
        by_target.setdefault(str(n.target), []).append(n)
    (mm,) = by_target["aten.mm.default"]
    (exp,) = by_target["aten.exp.default"]
    assert fuses_into_users(exp)  # read only by a sum: computed inside it
    assert not fuses_into_users(mm)  # a matmul's output is always stored
    # A pointwise value read by a matmul must be stored.
    lin = trace_joint(lambda x, w: (torch.relu(x) @ w).sum(), torch.randn(4, 8), torch.randn(8, 3, requires_grad=True), static=(1,))
    relu = [n for n in _info(lin).fw_nodes if n.target is torch.ops.aten.relu.default]
    assert relu and not fuses_into_users(relu[0])

    # Recomputing the whole chain from the matmul's output: the exact
    # simulation and the MILP's intervals charge the recomputed pointwise
    # values nothing, so only the stored matmul output and the small
    # reductions are live in the backward.
    recompute = {c for c in info.candidates if c not in info.not_recomputable and c is not mm}
    inputs = {p for p in info.primals if p not in info.param_primals}
    fw, bw = partition_with_plan(info, save={mm}, recompute=recompute, keep_primals=inputs)
    tl = simulate(info, fw, bw)
    fused_bytes = sum(info.nbytes[c] for c in recompute if fuses_into_users(c))
    assert fused_bytes > 2 * info.nbytes[mm]
    stored = info.nbytes[mm] + sum(info.nbytes[c] for c in recompute if not fuses_into_users(c))
    assert tl.peak <= stored
    iv = model_intervals(info, recompute)
    assert all(iv.bytes_recomputed[c] == 0 for c in recompute if fuses_into_users(c))


def test_solve_plan_pauses_the_cyclic_gc_and_restores_it(blocks_graph, monkeypatch):
    import gc

    info = _info(blocks_graph)
    seen = []
    real = S._solve_once

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "_solve_once", spy)
    was = gc.isenabled()
    try:
        for state in (True, False):
            (gc.enable if state else gc.disable)()
            S.solve_plan(info, _unit_costs(info), budget_bytes=10**12, time_limit=10, mip_gap=0.0,
                         share_layers=False)
            assert gc.isenabled() is state
            # An infeasible budget raises through the pause and still restores it.
            with pytest.raises(S.InfeasibleBudgetError):
                S.solve_plan(info, _unit_costs(info), budget_bytes=1000, time_limit=10, mip_gap=0.0,
                             share_layers=False)
            assert gc.isenabled() is state
    finally:
        (gc.enable if was else gc.disable)()
    assert seen and not any(seen)


def test_a_view_shares_its_base_storage_even_when_the_base_got_a_new_fake_value():
    """A decomposition gives the node it rewrites a fresh fake value; views traced from the old one stay views."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from adacc_compiler.passes.classify import storage_key

    def f(x):
        y = torch.exp(x)
        return y.expand(2, 4, 8).reshape(8, 8).permute(1, 0), y

    gm = make_fx(f, tracing_mode="fake")(torch.randn(2, 4, 8))
    exp = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.exp.default)
    views = [n for n in gm.graph.nodes if n.op == "call_function" and n is not exp]
    assert views and all(storage_key(v) == storage_key(exp) for v in views)
    # What a rewrite leaves: the base's value replaced, the views' values not.
    old = exp.meta["val"]
    exp.meta["val"] = torch.empty_like(old)
    assert old.untyped_storage() is not exp.meta["val"].untyped_storage()
    assert all(storage_key(v) == storage_key(exp) for v in views)
    # A value that is not a view keeps its own storage.
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert storage_key(x) != storage_key(exp)


def test_an_overflowing_plan_refitted_on_its_own_intervals_fits_them(blocks_graph):
    info = _info(blocks_graph)
    costs = _unit_costs(info)
    _, _, stock = _stock(blocks_graph)
    # A plan made for 0.6 of stock's peak, refitted under 0.55 (the same
    # situation as a plan that overflows its own intervals by that much).
    budget = int(0.55 * stock.peak)
    iv = model_intervals(info, window=S._window(info))
    first = S._solve_once(info, iv, costs, int(0.6 * stock.peak), 10, 0.0, False, [], None)
    own_iv = model_intervals(info, first.recompute)
    own = S._Model(info, own_iv, costs, False)
    x = own.vector(first.save, first.recompute, first.keep_primals, first.compress)
    assert own.model_peak(x) > budget, "the plan must overflow for the test to show anything"
    refitted = S._refit_on_own_intervals(info, own, x, first, costs, budget, None, time_limit=10, highs_seed=0)
    assert refitted is not None
    assert refitted.predicted_peak <= budget
    assert refitted.predicted_peak == S.own_peak(
        info, costs, refitted.save, refitted.recompute, refitted.keep_primals, refitted.compress
    )
    # Its partition's exact simulation agrees with its own intervals.
    fw, bw = partition_with_plan(info, save=refitted.save, recompute=refitted.recompute,
                                 keep_primals=refitted.keep_primals)
    assert simulate(info, fw, bw).peak <= budget * 1.02
    assert refitted.objective_s >= first.objective_s - 1e-12
    assert "refitted" in refitted.fallback


def test_learning_moves_only_intervals_that_cover_an_overflow_point(blocks_graph):
    import dataclasses

    info = _info(blocks_graph)
    costs = _unit_costs(info)
    _, _, stock = _stock(blocks_graph)
    iv = model_intervals(info, window=S._window(info))
    plan = S._solve_once(info, iv, costs, int(0.5 * stock.peak), 10, 0.0, False, [], None)
    own = model_intervals(info, plan.recompute)
    # Values whose own interval reaches past the model's, i.e. that could be learned.
    grown = [c for c in plan.recompute
             if own.need[c] < iv.need[c] - S._PULL_EPS or own.last_recomputed[c] > iv.last_recomputed[c]]
    assert len(grown) >= 2, "the plan must grow some intervals for the test to show anything"
    # An overflow point inside the first grown interval and outside another one.
    first = grown[0]
    point = own.need[first]
    outside = [c for c in grown if not own.need[c] <= point <= own.last_recomputed[c]]
    assert outside, "every grown interval covers the point: the test shows nothing"

    def fresh():
        return dataclasses.replace(iv, need=dict(iv.need), last_recomputed=dict(iv.last_recomputed))

    learning = fresh()
    moved = S._learn_overflowing_intervals(learning, own, plan.recompute, [point])
    assert moved >= 1
    assert learning.need[first] == min(iv.need[first], own.need[first])
    for c in outside:
        assert learning.need[c] == iv.need[c] and learning.last_recomputed[c] == iv.last_recomputed[c]
    # The model's own intervals are untouched, and nothing is learned without an overflow.
    assert S._learn_overflowing_intervals(fresh(), own, plan.recompute, []) == 0


def test_tensor_nbytes_of_a_symbolic_shape_uses_its_hint():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from adacc_compiler.passes.classify import tensor_nbytes

    mode = FakeTensorMode(shape_env=ShapeEnv())
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    t = mode.from_tensor(torch.randn(6, 8), symbolic_context=ctx)
    assert not isinstance(t.shape[0], int)
    assert tensor_nbytes(t) == 6 * 8 * 4


@pytest.mark.parametrize("share", [True, False])
def test_plan_noise_budget_bounds_the_summed_codec_error(blocks_graph, share):
    # Every value the backward reads may take a cheap lossy codec at 40 dB
    # (relative noise 1e-4): unbounded, a tight budget compresses many; with
    # a noise budget of 2.5e-4 the plan's summed noise stays under it, each
    # layer counted once per value even where layers share decisions.
    from adacc_compiler.passes.compress import CodecOption

    info = _info(blocks_graph)
    costs = _unit_costs(info)
    options = {
        c: [CodecOption(codec="lossy8", nbytes=info.nbytes[c] // 4, cost_s=1e-9, sqnr_db=40.0)]
        for c in info.boundary
        if isinstance(c.meta.get("val"), torch.Tensor) and info.nbytes.get(c, 0) > 0
    }
    _, _, stock = _stock(blocks_graph)
    budget = int(0.45 * stock.peak)

    def solve(noise_budget):
        return S.solve_plan(info, costs, budget_bytes=budget, time_limit=10, mip_gap=0.0, share_layers=share,
                            codec_options=options, noise_budget=noise_budget)

    free = solve(math.inf)
    assert len(free.compress) > 2, free.compress
    bounded = solve(2.5e-4)
    assert 0 < len(bounded.compress) <= 2, bounded.compress
    assert sum(o.noise for c in bounded.compress for o in options[c]) <= 2.5e-4 * (1 + 1e-9)
    assert bounded.predicted_peak <= budget
    # Giving up compression costs time: the bound is a real constraint.
    assert bounded.objective_s > free.objective_s


def test_rounds_are_solved_again_on_a_wider_window_when_nothing_fits(blocks_graph, monkeypatch):
    # Learning rounds that end without a fitting plan, and an exact-head
    # model without one, are followed by the rounds on a wider pull window
    # before adacc settles for the smallest-peak plan.
    info = _info(blocks_graph)
    _, _, stock = _stock(blocks_graph)
    budget = int(0.6 * stock.peak)
    real_rounds, real_once, real_intervals = S._learning_rounds, S._solve_once, S.model_intervals
    windows = []

    def intervals(info, recomputed=None, *, window=None):
        if recomputed is None:
            windows.append(window)
        return real_intervals(info, recomputed, window=window)

    def rounds(*args, **kwargs):
        if len(windows) == 1:
            return None, None, None  # the default window's rounds fit nothing
        return real_rounds(*args, **kwargs)

    def once(*args, exact_heads=False, **kwargs):
        if exact_heads:
            raise S._ModelInfeasible()
        return real_once(*args, exact_heads=exact_heads, **kwargs)

    monkeypatch.setattr(S, "model_intervals", intervals)
    monkeypatch.setattr(S, "_learning_rounds", rounds)
    monkeypatch.setattr(S, "_solve_once", once)
    res = S.solve_plan(info, _unit_costs(info), budget_bytes=budget, time_limit=10, mip_gap=0.0, share_layers=False)
    assert windows == [S._window(info), S._WIDE_WINDOW * S._window(info)]
    assert res.fallback is None or "smallest-peak" not in res.fallback
    assert res.predicted_peak <= budget
    fw, bw = partition_with_plan(info, save=res.save, recompute=res.recompute, keep_primals=res.keep_primals)
    assert simulate(info, fw, bw).peak <= budget * 1.02
