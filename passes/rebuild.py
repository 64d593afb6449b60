"""Multi-rebuild: recompute a value again in each backward region that reads it.

The MILP's plans rebuild each recomputed value once, at its first backward
reader, and hold it to its last. Under a tight budget that holding is what
overflows: in a deep MLP whose layers are all recomputed from the input, the
first layer's output is rebuilt for the last layer's gradient and then held
through the whole backward, as is every link of the chain after it. No
single-rebuild plan fits such a budget however many values it recomputes.

This pass rewrites a partitioned backward so that each *region* of it rebuilds
what it reads: a fresh copy of every recomputed value a region's backward
nodes read, and of the recomputed values those copies are built from, placed
just before its first reader in the region. A copy dies at its last reader in
its region, so across regions only the saved values stay live, at the price
of running a recomputed op once per region that needs it (the classic
checkpoint/revolve trade of memory for repeated work).

Regions are runs of backward nodes: a new one starts where the layer of the
forward values read changes (the backward visits the repeated layers in
reverse), and after every ``span`` nodes within a layer, so that a finer span
trades more rebuilds for a smaller working set. Decoded values are not copied:
a compressed value is decoded once.

Copies get fresh fake values, so the exact simulation
(:func:`adacc_compiler.passes.liveness.simulate_partition`) counts each as a
storage of its own, and ``node.meta["adacc_recompute_of"]`` names the forward
value they rebuild (what :func:`~adacc_compiler.passes.recompute.check_partition`
checks against the plan).
"""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.fx as fx

from adacc_compiler.passes import _torch as tp
from adacc_compiler.passes.classify import JointGraphInfo, is_alias

__all__ = ["rebuild_per_region", "backward_regions", "rebuild_counts", "LAYER_SPAN"]

# ``span`` meaning "no split within a layer": a region per layer visited.
LAYER_SPAN = 0


def _rebuilt_name(node: fx.Node, forward_names: set[str]) -> str | None:
    """The forward value a backward node rebuilds (None: not a rebuilt value)."""
    if node.op != "call_function":
        return None
    if "adacc_recompute_of" in node.meta:
        return node.meta["adacc_recompute_of"]
    return node.name if node.name in forward_names else None


def backward_regions(info: JointGraphInfo, bw_gm: fx.GraphModule, *, span: int = LAYER_SPAN) -> dict[fx.Node, int]:
    """Region index of each backward node that is not a rebuilt value.

    ``span`` > 0 also starts a region after every ``span`` such nodes.
    """
    if span < 0:
        raise ValueError(f"span must be >= 0 (0: one region per layer), got {span}")
    by_name = {n.name: n for n in info.fw_nodes} | {p.name: p for p in info.primals}
    forward_names = {n.name for n in info.fw_nodes}

    def layer(node: fx.Node) -> int | None:
        name = _rebuilt_name(node, forward_names) or (node.name if node.op == "placeholder" else None)
        joint = by_name.get(name) if name else None
        where = info.layer_of.get(joint) if joint is not None else None
        return where[0] if where else None

    region: dict[fx.Node, int] = {}
    current, last_layer, count = 0, None, 0
    for n in bw_gm.graph.nodes:
        if n.op == "placeholder" or _rebuilt_name(n, forward_names) is not None:
            continue
        layers = [l for l in map(layer, n.all_input_nodes) if l is not None]
        if layers and max(layers) != last_layer:
            if last_layer is not None or count:
                current += 1
            last_layer, count = max(layers), 0
        elif span and count >= span:
            current, count = current + 1, 0
        count += 1
        region[n] = current
    return region


def _fresh(val: Any) -> Any:
    """A fake value like ``val`` with storage of its own (tuples elementwise)."""
    if isinstance(val, torch.Tensor):
        with tp.fake_mode([val]):
            return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
    if isinstance(val, (tuple, list)):
        return type(val)(_fresh(v) for v in val)
    return val


def rebuild_per_region(info: JointGraphInfo, bw_gm: fx.GraphModule, *, span: int = LAYER_SPAN) -> dict[str, int]:
    """Rewrite ``bw_gm`` in place so each region rebuilds the recomputed values it reads.

    Returns, per rebuilt forward value, how many times the backward now
    computes it.
    """
    forward_names = {n.name for n in info.fw_nodes}
    region = backward_regions(info, bw_gm, span=span)
    graph = bw_gm.graph
    copies: dict[tuple[fx.Node, int], fx.Node] = {}
    ordered = _ordering_sources(graph, region, forward_names)
    guards: dict[tuple[fx.Node, int], fx.Node] = {}

    def guarded(value: fx.Node, r: int, before: fx.Node) -> fx.Node:
        # ``value`` as a fusible copy in region r reads it: through a select
        # that depends on the previous region (see _ordered_read).
        if r not in ordered or not isinstance(value.meta.get("val"), torch.Tensor):
            return value
        key = (value, r)
        if key not in guards:
            guards[key] = _ordered_read(graph, value, ordered[r], before)
        return guards[key]

    def copy_in(node: fx.Node, r: int, before: fx.Node) -> fx.Node:
        key = (node, r)
        if key in copies:
            return copies[key]
        fusible = _fusible_kernel(node)
        env = {
            a: copy_in(a, r, before) if _rebuilt_name(a, forward_names)
            else guarded(a, r, before) if fusible else a
            for a in node.all_input_nodes
        }
        with graph.inserting_before(before):
            new = graph.node_copy(node, lambda a: env[a])
        new.meta = dict(node.meta)
        new.meta["adacc_recompute_of"] = _rebuilt_name(node, forward_names)
        # A view's storage is its base's (keyed through its input); everything
        # else gets a storage of its own, so each copy is counted on its own.
        if not is_alias(node):
            new.meta["val"] = _fresh(node.meta.get("val"))
        copies[key] = new
        return new

    originals = [n for n in graph.nodes if _rebuilt_name(n, forward_names)]
    original_set = set(originals)
    for n in list(graph.nodes):
        if n not in region:
            continue
        for a in list(n.all_input_nodes):
            if a in original_set:
                n.replace_input_with(a, copy_in(a, region[n], n))
    for n in reversed(originals):
        assert not n.users, f"{n.name} still read after the rewrite: {list(n.users)}"
        graph.erase_node(n)
    graph.lint()
    bw_gm.recompile()
    return dict(collections.Counter(new.meta["adacc_recompute_of"] for new in copies.values()))


_aten = torch.ops.aten
_REDUCTIONS = frozenset({
    _aten.sum.dim_IntList, _aten.sum.default, _aten.mean.dim, _aten.mean.default, _aten.amax.default,
    _aten.amin.default, _aten.var_mean.correction, _aten.max.dim, _aten.min.dim,
})


def _fusible_kernel(node: fx.Node) -> bool:
    """Whether Inductor computes ``node`` in a kernel it may fuse with another that reads the same buffer.

    Pointwise ops and reductions; matrix multiplies run as library calls and
    are never fused that way, and the ``where`` in front of one would be
    materialised as a copy.
    """
    return torch.Tag.pointwise in getattr(node.target, "tags", ()) or node.target in _REDUCTIONS


def _ordering_sources(graph: fx.Graph, region: dict[fx.Node, int], forward_names: set[str]) -> dict[int, fx.Node]:
    """Per region after the first, a gradient the previous region outputs.

    Inductor fuses kernels that read the same buffer when neither depends on
    the other: two regions' copies of a pointwise op on one checkpoint would
    become one kernel at the first region, and the later copy would live
    from there. A copy that also reads a value the previous region computed
    cannot run before it. A gradient the graph returns is the value to use:
    it stays allocated to the end anyway.
    """
    out: dict[int, fx.Node] = {}
    last_output: fx.Node | None = None
    seen_regions: set[int] = set()
    for n in graph.nodes:
        r = region.get(n)
        if r is not None and r not in seen_regions:
            seen_regions.add(r)
            if last_output is not None and region.get(last_output, r) < r:
                out[r] = last_output
        if (
            n.op == "call_function"
            and _rebuilt_name(n, forward_names) is None
            and isinstance(n.meta.get("val"), torch.Tensor)
            and tp.int_hint(n.meta["val"].numel(), fallback=0) > 0
            and any(u.op == "output" for u in n.users)
        ):
            last_output = n
    return out


def _ordered_read(graph: fx.Graph, value: fx.Node, source: fx.Node, before: fx.Node) -> fx.Node:
    """``where(s == s, value, value)`` with ``s`` one element of ``source``: ``value`` itself, ordered after ``source``.

    Both branches are ``value``, so the result is ``value`` bit for bit
    whatever ``s`` holds (NaN included); Inductor computes it inside the
    kernel that reads it (pointwise or reduction).
    """
    def add(op, *args):
        node = graph.call_function(op, args)
        node.meta["val"] = tp.fake_call(op, *(a.meta["val"] if isinstance(a, fx.Node) else a for a in args))
        return node

    with graph.inserting_before(before):
        element = source
        while element.meta["val"].dim() > 0:
            element = add(_aten.select.int, element, 0, 0)
        same = add(_aten.eq.Tensor, element, element)
        return add(_aten.where.self, same, value, value)


def rebuild_counts(info: JointGraphInfo, bw_gm: fx.GraphModule) -> dict[str, int]:
    """Per recomputed forward value, how many times ``bw_gm`` computes it."""
    forward_names = {n.name for n in info.fw_nodes}
    names = (_rebuilt_name(n, forward_names) for n in bw_gm.graph.nodes)
    return dict(collections.Counter(name for name in names if name))
