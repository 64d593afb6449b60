"""Rewrite: split the joint graph so that the backward follows the plan exactly.

Given the values to save, to recompute and to compress, the forward graph
returns exactly the saved values and the compressed values' payloads, and the
backward graph rebuilds each recomputed value from saved, kept or decoded
ones, and decodes each compressed one, just before its first backward use. The
result is checked against the plan: a partition that saves or recomputes
anything the plan did not ask for is an error, never a silent deviation.
Decisions are recorded in ``node.meta["adacc"]`` on the joint graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from adacc_compiler.passes import _torch as tp
from adacc_compiler.passes.classify import JointGraphInfo
from adacc_compiler.passes.compress import codecs_inserted
from adacc_compiler.passes.liveness import dependency_graph, saved_names
from adacc_compiler.plan import COMPRESS, DROP, RECOMPUTE, RETAIN

__all__ = ["tag_plan", "partition_with_plan", "check_closed", "check_partition", "PlanMismatchError"]


class PlanMismatchError(RuntimeError):
    """The partitioned graphs do not do what the plan says."""


def tag_plan(
    info: JointGraphInfo, save: set[fx.Node], recompute: set[fx.Node], compress: dict[fx.Node, str] | None = None
) -> None:
    compress = compress or {}
    for c in info.candidates:
        c.meta["adacc"] = (
            RETAIN if c in save else RECOMPUTE if c in recompute else COMPRESS if c in compress else DROP
        )
        if c in compress:
            c.meta["adacc_codec"] = compress[c]


def partition_with_plan(
    info: JointGraphInfo,
    *,
    save: set[fx.Node],
    recompute: set[fx.Node],
    keep_primals: set[fx.Node],
    compress: dict[fx.Node, str] | None = None,
    stochastic: bool = False,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    compress = compress or {}
    check_closed(info, save=save, recompute=recompute, keep_primals=keep_primals, compress=compress)
    with codecs_inserted(info, compress, recompute=recompute, stochastic=stochastic) as payloads:
        return _split(info, save=save, recompute=recompute, keep_primals=keep_primals, payloads=payloads)


def _split(
    info: JointGraphInfo,
    *,
    save: set[fx.Node],
    recompute: set[fx.Node],
    keep_primals: set[fx.Node],
    payloads: dict[fx.Node, list[fx.Node]],
) -> tuple[fx.GraphModule, fx.GraphModule]:
    gm = info.gm
    payload_nodes = [p for items in payloads.values() for p in items]
    order = info.order
    needs = set(info.bw_nodes) | recompute
    primals_needed = {
        a for n in needs for a in n.all_input_nodes if a.op == "placeholder" and tp._is_primal(a)
    } | {b for b in info.boundary if b.op == "placeholder"}
    sym_nodes = [
        n
        for n in gm.graph.nodes
        if (n.op == "placeholder" and tp._is_primal(n) or info.is_fw(n)) and tp.is_sym_node(n)
    ]
    tensor_primals = {p for p in primals_needed if not tp.is_sym_node(p)}
    missing = {p for p in tensor_primals if p not in info.param_primals and p not in keep_primals}
    if missing:
        raise PlanMismatchError(f"plan reads inputs it does not keep: {sorted(p.name for p in missing)}")
    # Payload nodes are new: they sort right after the value they encode.
    position = dict(order)
    for value, items in payloads.items():
        for i, p in enumerate(items):
            position[p] = order[value] + (i + 1) / (len(items) + 1)
    saved_values = sorted(
        (save - set(sym_nodes)) | tensor_primals | set(payload_nodes), key=position.__getitem__
    )
    saved_syms = sorted(set(sym_nodes), key=order.__getitem__)
    fw_gm, bw_gm = tp.extract_fwd_bwd(
        gm,
        saved_values,
        saved_syms,
        num_fwd_outputs=info.num_fwd_outputs,
        static_lifetime_input_nodes=info.node_info.static_lifetime_input_nodes,
    )
    fw_gm, bw_gm = tp.finish_backward(fw_gm, bw_gm)
    check_partition(info, fw_gm, bw_gm, save=save | set(payload_nodes), recompute=recompute)
    return fw_gm, bw_gm


def check_closed(
    info: JointGraphInfo,
    *,
    save: set[fx.Node],
    recompute: set[fx.Node],
    keep_primals: set[fx.Node],
    compress: dict[fx.Node, str] | None = None,
) -> None:
    """Every value the backward reads, or rebuilds from, must be available to it.

    A compressed value is available to both: recomputation reads its decoded
    copy (a compressed checkpoint).
    """
    compress = compress or {}
    both = set(compress) & (save | recompute)
    if both:
        raise PlanMismatchError(f"the plan both compresses and saves or recomputes: {sorted(n.name for n in both)}")
    graph = dependency_graph(info)
    available = {n.name for n in save | recompute | keep_primals | set(compress)} | {p.name for p in info.param_primals}
    available |= {n.name for n in info.candidates if tp.is_sym_node(n)}
    available |= {p.name for p in info.primals if tp.is_sym_node(p)}
    missing = {}
    for node in recompute:
        lacking = [a for a in graph.predecessors(node.name) if a not in available]
        if lacking:
            missing[node.name] = lacking
    for node in info.boundary:
        if node.name not in available and node not in compress and isinstance(node.meta.get("val"), torch.Tensor):
            missing[node.name] = ["(read by the backward)"]
    if missing:
        raise PlanMismatchError(f"the plan leaves values unavailable to the backward: {dict(list(missing.items())[:10])}")


def check_partition(
    info: JointGraphInfo,
    fw_gm: fx.GraphModule,
    bw_gm: fx.GraphModule,
    *,
    save: set[fx.Node],
    recompute: set[fx.Node],
) -> None:
    """Fail loudly unless the saved set and the recomputed set are the plan's."""
    got_saved = set(saved_names(bw_gm))
    planned_saved = {n.name for n in save}
    extra_saved = got_saved - planned_saved - {p.name for p in info.primals}
    if extra_saved:
        raise PlanMismatchError(f"the partition saves values the plan does not: {sorted(extra_saved)}")
    fw_names = {n.name for n in info.fw_nodes}
    got_recomputed = {n.name for n in bw_gm.graph.nodes if n.op == "call_function" and n.name in fw_names}
    # Values rebuilt from a decoded checkpoint run as copies of their forward op.
    got_recomputed |= {
        n.meta["adacc_recompute_of"] for n in bw_gm.graph.nodes if "adacc_recompute_of" in n.meta
    }
    planned_recomputed = {n.name for n in recompute}
    extra = got_recomputed - planned_recomputed
    if extra:
        raise PlanMismatchError(f"the backward recomputes values the plan does not: {sorted(extra)[:20]}")
