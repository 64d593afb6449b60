"""The ``adacc`` torch.compile backend and its partitioner.

``torch.compile(model, backend="adacc", options={...})`` reaches
:func:`adacc_backend` through the ``torch_dynamo_backends`` entry point.
Graphs that need gradients go to Inductor with :class:`AdaccPartitioner` as
its custom partitioner: Inductor's joint-graph passes run first, then adacc
analyses the joint graph, solves the MILP, splits forward and backward
following the plan exactly, verifies the plan with the exact liveness
simulation, and hands both graphs back to Inductor for code generation.
Graphs that need no gradient go to Inductor unchanged.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from adacc_compiler.config import AdaccConfig
from adacc_compiler.evolve import EvolvingGraph, PlanMonitor
from adacc_compiler.plan import COMPRESS, DROP, RECOMPUTE, RETAIN, Decision, MemoryTimeline, Plan

log = logging.getLogger(__name__)

__all__ = ["adacc_backend", "AdaccPartitioner", "CompiledGraph", "compiled_graphs", "last_plan", "BudgetExceededError"]

# The budget is checked against the exact simulation with this relative slack,
# which only absorbs rounding in the byte counts.
_BUDGET_RTOL = 1e-6
_MAX_TIGHTENING_ROUNDS = 4
# Margin on the smallest feasible budget an infeasibility error states.
_SMALLEST_HEADROOM = 0.05
# With multi-rebuild on, a budget below this share of the smallest peak an
# earlier compile of the graph reached with single-rebuild plans skips the
# MILP: its search for a fitting plan, then for the smallest peak, ends in the
# multi-rebuild fallback anyway (on the 6-layer test Llama at 0.2, tens of
# seconds). Near that peak the MILP still runs, as it may find a smaller one.
_SKIP_SINGLE_REBUILD_BELOW = 0.9


class BudgetExceededError(RuntimeError):
    """The exact liveness simulation of the best plan found exceeds the budget."""


@dataclass
class CompiledGraph:
    """What adacc decided for one compiled graph (kept for inspection)."""

    graph_id: str
    plan: Plan
    stock_timeline: MemoryTimeline
    plan_timeline: MemoryTimeline
    config: AdaccConfig
    dump_path: str | None = None
    forward_graph: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    backward_graph: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    # The plan's lossy codecs and their checks while training (None: no lossy codec).
    monitor: PlanMonitor | None = dataclasses.field(default=None, repr=False)
    # A re-plan's predecessor, whose codecs drifted (policy evolution).
    replaces: str | None = None


_history: collections.deque[CompiledGraph] = collections.deque(maxlen=256)


@dataclass
class _InFlight:
    """One compile in flight: what its partitioner needs and what it hands back."""

    inputs: Sequence[Any]  # the real inputs: the partitioner measures codecs on actual values
    notes: list[str]  # for the plan's notes (why it was made)
    records: list[CompiledGraph] = dataclasses.field(default_factory=list)


# By partitioner nonce, while compile_fx runs (Inductor deep-copies its
# config, partitioner included, so this cannot live on the partitioner).
_in_flight: dict[bytes, _InFlight] = {}
_counter = itertools.count()
_lock = threading.Lock()


def compiled_graphs() -> list[CompiledGraph]:
    """The graphs adacc compiled in this process, oldest first (up to 256)."""
    with _lock:
        return list(_history)


def last_plan() -> Plan:
    """The plan of the most recently compiled graph."""
    with _lock:
        if not _history:
            raise RuntimeError("adacc has not compiled any graph that needs gradients in this process yet")
        return _history[-1].plan


def _code_version() -> bytes:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    files = []
    for folder in (here, os.path.join(here, "passes"), os.path.join(root, "passes")):
        if os.path.isdir(folder):
            files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]
    return get_hash_for_files(tuple(files))


def _needs_grad(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def adacc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """Entry point Dynamo calls: ``torch.compile(model, backend="adacc", options=...)``."""
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise ValueError(f"adacc backend: unexpected argument(s) {sorted(kwargs)}; pass settings through options={{...}}")
    if mode not in (None, "default"):
        raise ValueError(f"mode: adacc accepts only mode=None or 'default', got {mode!r}; use options={{...}} instead")
    config = AdaccConfig.from_options(options)
    from torch._inductor.compile_fx import compile_fx

    if not _needs_grad(example_inputs):
        log.debug("adacc: graph needs no gradient; compiling with stock Inductor")
        return compile_fx(gm, example_inputs)

    def compile_once(inputs: Sequence[Any], reason: str | None = None):
        partitioner = AdaccPartitioner(config)
        flight = _InFlight(inputs=inputs, notes=[reason] if reason else [])
        # The AOTAutograd cache would hand back a partition without calling the
        # partitioner; adacc re-plans on every compile instead. Inductor's FX-graph
        # cache stays on: its keys are the partitioned graphs, which encode the plan.
        from torch._functorch import config as functorch_config

        with _lock:
            _in_flight[partitioner._nonce] = flight
        try:
            with functorch_config.patch(enable_autograd_cache=False):
                # Dynamo's own graph module, not a copy: AOTAutograd reads which
                # inputs are parameters from attributes a copy loses.
                compiled = compile_fx(gm, list(inputs), config_patches={"custom_partitioner_fn": partitioner})
        finally:
            with _lock:
                _in_flight.pop(partitioner._nonce, None)
        return compiled, (flight.records[-1] if flight.records else None)

    compiled, record = compile_once(example_inputs)
    if config.recheck_after is None or record is None or record.monitor is None:
        return compiled
    return EvolvingGraph(compiled, record, compile_once, first_check=config.recheck_after)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose nodes (and meta dicts) the stock partitioner may mutate freely."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_val, old_out = graph.graph_copy(gm.graph, env, return_output_node=True)
    new_out = graph.output(out_val)
    new_out.meta = copy.copy(old_out.meta)
    return fx.GraphModule(gm, graph)


class AdaccPartitioner(CustomPartitionerFn):
    """Inductor custom partitioner that follows adacc's plan."""

    def __init__(self, config: AdaccConfig) -> None:
        self.config = config
        self._cost_model = None
        # The plan also depends on measured costs and, later, on statistics
        # gathered while training, none of which a cache key made before the
        # partitioner runs can see. A per-compile nonce makes Inductor's
        # AOTAutograd cache miss even when TORCHINDUCTOR_AUTOGRAD_CACHE=1
        # forces it on, so every compile plans for its own budget.
        self._nonce = os.urandom(16)

    def uuid(self) -> bytes:
        return hashlib.sha256(_code_version() + self.config.fingerprint().encode() + self._nonce).digest()

    def _costs(self):
        if self._cost_model is None:
            from adacc_compiler.costs import CostModel

            self._cost_model = CostModel(profile=self.config.profile, cache_dir=self.config.cache_dir)
        return self._cost_model

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        from adacc_compiler.passes import _torch as tp

        num_fwd_outputs = kwargs["num_fwd_outputs"]
        static = kwargs.get("static_lifetime_input_indices") or []
        gm = tp.prepare_joint_graph(gm)
        with _lock:
            flight = _in_flight.get(self._nonce)
        return plan_and_partition(
            gm,
            joint_inputs,
            config=self.config,
            num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=list(static),
            cost_model=self._costs(),
            real_inputs=flight.inputs if flight else None,
            notes=flight.notes if flight else (),
            records=flight.records if flight else None,
        )


def _codec_options(info, menus, cost_model, costs, *, stochastic: bool) -> dict[fx.Node, list]:
    """Each offered codec with its payload bytes and measured encode + decode time.

    A checkpoint's codec (the value is not read by the backward) is offered
    only when it costs less than re-running the value's own op (``costs``):
    storing it serves only to spare that op.
    """
    from adacc_compiler.passes.compress import CodecOption, fusible_on, inlined_neighbours
    from adacc_compiler.triton_kernels import get_codec

    options = {}
    for node, menu in menus.items():
        val = node.meta["val"]
        shape = tuple(int(s) for s in val.shape)
        encode_joins, decode_joins = inlined_neighbours(info, node)
        opts = []
        for name in menu.codecs:
            codec = get_codec(name)
            fused = fusible_on(val.device, stochastic=stochastic, codec=name, shape=shape)
            opts.append(
                CodecOption(
                    codec=name,
                    nbytes=int(codec.compressed_nbytes(shape, val.dtype)),
                    cost_s=float(
                        cost_model.codec_cost(
                            name,
                            shape,
                            val.dtype,
                            val.device,
                            fused=fused,
                            encode_joins=fused and encode_joins,
                            decode_joins=fused and decode_joins,
                        )
                    ),
                    sqnr_db=None if codec.lossless else menu.sqnr_db.get(name),
                )
            )
        # A codec that stores more than the value itself is never worth it.
        opts = [o for o in opts if o.nbytes < info.nbytes.get(node, 0)]
        if menu.checkpoint:
            opts = [o for o in opts if o.cost_s < costs.get(node, 0.0)]
        if opts:
            options[node] = opts
    return options


def stock_partition(
    gm: fx.GraphModule, joint_inputs: Sequence[object], *, num_fwd_outputs: int, static_lifetime_input_indices: list[int]
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """What stock Inductor's partitioner makes of the same joint graph."""
    from torch._functorch import config as functorch_config

    from adacc_compiler.passes import _torch as tp

    with functorch_config.patch(activation_memory_budget=1.0):
        return tp.min_cut_rematerialization_partition(
            _copy_graph_module(gm),
            joint_inputs,
            compiler="inductor",
            num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=static_lifetime_input_indices,
        )


def plan_and_partition(
    gm: fx.GraphModule,
    joint_inputs: Sequence[object],
    *,
    config: AdaccConfig,
    num_fwd_outputs: int,
    static_lifetime_input_indices: list[int],
    cost_model,
    real_inputs: Sequence[Any] | None = None,
    notes: Sequence[str] = (),
    records: list[CompiledGraph] | None = None,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Analyse, plan, split and verify one prepared joint graph.

    ``real_inputs`` (the graph's actual inputs, when known) let lossy codecs be
    measured on actual values; without them only lossless codecs are offered.
    ``notes`` open the plan's notes; the graph's record is appended to
    ``records`` when given (and always kept in :func:`compiled_graphs`).
    """
    from adacc_compiler.passes import _torch as tp
    from adacc_compiler.passes.classify import analyze_joint_graph
    from adacc_compiler.passes.compress import codec_menus, measure_menus
    from adacc_compiler.passes.liveness import partition_choices, simulate
    from adacc_compiler.passes.rebuild import rebuild_counts
    from adacc_compiler.passes.recompute import partition_with_plan, tag_plan
    from adacc_compiler import multi_rebuild
    from adacc_compiler import smallest as smallest_plans
    from adacc_compiler.solver import InfeasibleBudgetError, SolveResult, solve_plan

    t_start = time.perf_counter()
    info = analyze_joint_graph(
        gm, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_lifetime_input_indices
    )
    if not info.bw_nodes:
        log.info("adacc: joint graph has no backward nodes; using the default partition")
        return tp.default_partition(
            gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_lifetime_input_indices
        )
    with _lock:
        index = next(_counter)
    graph_id = f"graph_{index:03d}_{hashlib.sha1(gm.code.encode()).hexdigest()[:6]}"

    fw_stock, bw_stock = stock_partition(
        gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_lifetime_input_indices
    )
    stock_tl = simulate(info, fw_stock, bw_stock)
    stock_choices = partition_choices(info, bw_stock)
    stock_saved = stock_tl.saved_bytes
    # A fractional budget is relative to stock Inductor's own peak of live
    # activation memory (what it saves plus what its backward recomputes): the
    # same quantity the budget bounds, so 1.0 always admits stock's choice.
    stock_peak = stock_tl.peak
    if config.budget_is_fraction:
        budget = int(math.floor(float(config.memory_budget) * stock_peak))
    else:
        budget = int(config.memory_budget)

    recomputable = [c for c in info.candidates if c not in info.not_recomputable]
    t_cost = time.perf_counter()
    costs = cost_model.recompute_costs(recomputable)
    t_cost = time.perf_counter() - t_cost

    t_codec = time.perf_counter()
    menus = codec_menus(
        info, mode=config.compress, sensitive=config.compress_sensitive, checkpoints=config.compress_checkpoints
    )
    codec_note = measure_menus(
        info, menus, real_inputs, min_sqnr_db=config.min_sqnr_db, stochastic=config.stochastic_rounding
    )
    codec_options = _codec_options(info, menus, cost_model, costs, stochastic=config.stochastic_rounding)
    t_codec = time.perf_counter() - t_codec

    def partition(plan):
        return partition_with_plan(
            info,
            save=plan.save,
            recompute=plan.recompute,
            keep_primals=plan.keep_primals,
            compress=plan.compress,
            stochastic=config.stochastic_rounding,
        )

    plan_key = smallest_plans.plan_key(gm, config)
    remembered = smallest_plans.recall(config, plan_key, gm, codec_options)
    target = budget
    attempts = []
    for attempt in range(_MAX_TIGHTENING_ROUNDS):
        try:
            if (
                attempt == 0
                and config.multi_rebuild
                and remembered is not None
                and budget < _SKIP_SINGLE_REBUILD_BELOW * remembered[0]
            ):
                log.debug(
                    "adacc %s: budget %d is below the smallest single-rebuild peak remembered (%d); "
                    "multi-rebuild plans only", graph_id, budget, remembered[0],
                )
                raise InfeasibleBudgetError(
                    "below the remembered smallest single-rebuild peak",
                    min_feasible_bytes=remembered[0],
                    budget_bytes=budget,
                    plan=SolveResult.remembered(**remembered[1]),
                )
            res = solve_plan(
                info,
                costs,
                budget_bytes=target,
                time_limit=config.solver_time_limit,
                mip_gap=config.solver_mip_gap,
                share_layers=config.share_layers,
                codec_options=codec_options,
                seed=stock_choices,
                noise_budget=config.plan_noise_budget,
            )
        except InfeasibleBudgetError as err:
            # The error carries the smallest-peak plan, and an earlier compile
            # of this graph may have remembered a smaller one; their exact
            # simulations decide. The smaller is used if it fits the budget
            # (the model's target may have been lowered below what it needs),
            # and otherwise its simulated peak is the smallest budget stated.
            candidates = [err.plan]
            if remembered is not None and err.plan.status != SolveResult.REMEMBERED:
                candidates.append(dataclasses.replace(err.plan, **remembered[1]))
            best = None
            for candidate in candidates:
                fw_gm, bw_gm = partition(candidate)
                plan_tl = simulate(info, fw_gm, bw_gm)
                if best is None or plan_tl.peak < best[0].peak:
                    best = (plan_tl, candidate, fw_gm, bw_gm)
            plan_tl, fallback, fw_gm, bw_gm = best
            smallest_plans.remember(config, plan_key, plan_tl.peak, fallback)
            attempts.append((target, fallback.predicted_peak, plan_tl.peak))
            if plan_tl.peak <= budget * (1 + _BUDGET_RTOL):
                res = fallback
                res.predicted_peak = plan_tl.peak
                res.fallback = (
                    f"no plan fitted the model's budget of {target} bytes; the smallest-peak plan fits the budget"
                )
                break
            smallest_peak = plan_tl.peak
            if config.multi_rebuild:
                t_search = time.perf_counter()
                rebuilt, floor = multi_rebuild.search(
                    info,
                    multi_rebuild.bases(info, fallback),
                    costs,
                    budget=budget,
                    partition=partition,
                )
                if rebuilt is not None:
                    res = dataclasses.replace(
                        rebuilt.base,
                        objective_s=rebuilt.cost_s,
                        predicted_peak=rebuilt.timeline.peak,
                        status="multi-rebuild",
                        bound_s=math.nan,
                        gap=math.nan,
                        time_s=fallback.time_s + time.perf_counter() - t_search,
                        fallback=f"no single-rebuild plan fits (smallest peak {plan_tl.peak} bytes); {rebuilt.describe()}",
                    )
                    fw_gm, bw_gm, plan_tl = rebuilt.fw_gm, rebuilt.bw_gm, rebuilt.timeline
                    break
                smallest_peak = min(smallest_peak, floor.timeline.peak)
            # Headroom for another machine's timings: the cost model, and so
            # the plans compared, may differ there.
            smallest = int(math.ceil(smallest_peak * (1 + _SMALLEST_HEADROOM)))
            frac = (
                f" ({smallest / stock_peak:.3f} of stock Inductor's peak of {stock_peak} bytes)" if stock_peak else ""
            )
            raise InfeasibleBudgetError(
                f"adacc: memory_budget={config.memory_budget!r} ({budget} bytes) is infeasible for {graph_id}; "
                f"the smallest budget adacc finds feasible for this graph is {smallest} bytes{frac}",
                min_feasible_bytes=smallest,
                budget_bytes=budget,
            ) from None
        fw_gm, bw_gm = partition(res)
        plan_tl = simulate(info, fw_gm, bw_gm)
        attempts.append((target, res.predicted_peak, plan_tl.peak))
        if not config.verify or plan_tl.peak <= budget * (1 + _BUDGET_RTOL):
            break
        excess = plan_tl.peak - budget
        log.debug(
            "adacc %s: simulated peak %d exceeds budget %d by %d bytes (model predicted %d); tightening",
            graph_id,
            plan_tl.peak,
            budget,
            excess,
            res.predicted_peak,
        )
        # Below the plan's own model peak: a target between it and the old
        # one admits the same plan again (it fitted with room to spare).
        target = max(1, min(target, res.predicted_peak) - excess)
    else:
        raise BudgetExceededError(
            f"adacc: after {_MAX_TIGHTENING_ROUNDS} rounds the best plan for {graph_id} still peaks at "
            f"{plan_tl.peak} bytes over the budget of {budget} bytes (attempts: model budget, model peak, "
            f"simulated peak = {attempts}). Raise memory_budget, or pass options={{'verify': False}} to accept it."
        )
    tag_plan(info, res.save, res.recompute, res.compress)

    # The option each compressed value takes: its codec's bytes, cost and SQNR.
    chosen_options = {n: next(o for o in codec_options[n] if o.codec == c) for n, c in res.compress.items()}
    decisions = []
    boundary = set(info.boundary)
    rebuilds = rebuild_counts(info, bw_gm)
    for c in info.candidates:
        val = c.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        choice = (
            RETAIN if c in res.save else RECOMPUTE if c in res.recompute else COMPRESS if c in res.compress else DROP
        )
        menu = menus.get(c)
        chosen = chosen_options.get(c)
        decisions.append(
            Decision(
                name=c.name,
                shape=tuple(int(s) if isinstance(s, int) else str(s) for s in val.shape),
                dtype=str(val.dtype),
                nbytes=info.nbytes.get(c, 0),
                producer=str(getattr(c.target, "__name__", c.target)),
                choice=choice,
                cost_s=float(costs.get(c, 0.0)),
                layer=info.layer_of.get(c, (None, None))[0],
                needed_by_backward=c in boundary,
                role=menu.role if menu else "",
                rule=menu.rule if menu else "",
                menu={o.codec: o.sqnr_db for o in codec_options.get(c, ())},
                codec=chosen.codec if chosen else None,
                compressed_nbytes=chosen.nbytes if chosen else None,
                codec_cost_s=chosen.cost_s if chosen else None,
                rebuilds=rebuilds.get(c.name) if choice == RECOMPUTE else None,
            )
        )
    fixed = sum(info.nbytes.get(p, 0) for p in res.keep_primals)
    solver = res.summary()
    notes = list(notes)
    if codec_note:
        notes.append(codec_note)
    if len(attempts) > 1:
        notes.append(f"budget tightened {len(attempts) - 1} time(s) after the exact simulation: {attempts}")
    plan = Plan(
        graph_id=graph_id,
        budget_bytes=budget,
        stock_saved_bytes=stock_saved,
        stock_peak_bytes=stock_peak,
        predicted_saved_bytes=plan_tl.saved_bytes,
        predicted_peak_bytes=plan_tl.peak,
        estimated_overhead_s=res.objective_s,
        decisions=decisions,
        solver=solver,
        fixed_saved_bytes=fixed,
        notes=notes,
    )
    counts = plan.counts()
    log.info(
        "adacc %s: budget %.2f MiB (stock peak %.2f MiB, saves %.2f MiB), predicted peak %.2f MiB, saved %.2f MiB; "
        "retain %d, recompute %d, compress %d (%s, plan SQNR %.1f dB), drop %d; est. overhead %.1f us/step; "
        "solve %.2f s (%s, gap %.2f%%%s); planning %.2f s (costs %.2f s, codecs %.2f s)",
        graph_id,
        budget / 2**20,
        stock_peak / 2**20,
        stock_saved / 2**20,
        plan.predicted_peak_bytes / 2**20,
        plan.predicted_saved_bytes / 2**20,
        counts[RETAIN],
        counts[RECOMPUTE],
        counts[COMPRESS],
        ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(res.compress.values()).items())) or "none",
        plan.plan_sqnr_db(),
        counts[DROP],
        res.objective_s * 1e6,
        res.time_s,
        res.status,
        100 * res.gap if math.isfinite(res.gap) else float("inf"),
        f", {res.fallback}" if res.fallback else "",
        time.perf_counter() - t_start,
        t_cost,
        t_codec,
    )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("adacc %s decisions:\n%s", graph_id, plan.table())

    record = CompiledGraph(
        graph_id,
        plan,
        stock_tl,
        plan_tl,
        config,
        forward_graph=fw_gm,
        backward_graph=bw_gm,
        monitor=_monitor(info, chosen_options, menus, config),
    )
    if config.dump_dir:
        from adacc_compiler.dump import write_dumps

        record.dump_path = str(
            write_dumps(
                config.dump_dir,
                graph_id,
                joint_gm=gm,
                fw_gm=fw_gm,
                bw_gm=bw_gm,
                plan=plan,
                stock_timeline=stock_tl,
                plan_timeline=plan_tl,
                extra={"cost_model": getattr(cost_model, "stats", None), "config": config.fingerprint()},
            )
        )
    with _lock:
        _history.append(record)
    if records is not None:
        records.append(record)
    return fw_gm, bw_gm


def _monitor(info, chosen_options, menus, config: AdaccConfig):
    """What a codec check needs of the plan (None: the plan holds no lossy codec)."""
    lossy = {n: o for n, o in chosen_options.items() if o.sqnr_db is not None}
    if not lossy:
        return None
    return PlanMonitor(
        info=info,
        codecs={n: o.codec for n, o in lossy.items()},
        checkpoints=frozenset(n for n in lossy if menus[n].checkpoint),
        planned_sqnr_db={n: o.sqnr_db for n, o in lossy.items()},
        min_sqnr_db=config.min_sqnr_db,
        min_plan_sqnr_db=config.min_plan_sqnr_db,
        tolerance_db=config.recheck_tolerance_db,
        stochastic=config.stochastic_rounding,
    )
