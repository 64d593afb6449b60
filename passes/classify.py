"""Joint-graph analysis: forward/backward split, candidate activations, layers.

Everything here works on the decomposed ATen joint graph AOTAutograd hands a
partitioner, so op names such as ``gelu`` have become ``mul``/``erf``/...:
candidates and layers are found from graph structure, never from module or
op names.

Vocabulary:

* **forward-computable** node: computable from the primals alone (not in the
  tangents' closure). The forward runs these; the backward may recompute them.
* **backward** node: depends on a tangent, or must run in the backward.
* **boundary** value: a forward-computable value read by a backward node. Each
  must be available in the backward: saved (retained) or recomputed.
* **candidate**: a forward-computable tensor value upstream of the boundary; a
  recomputed candidate needs its own inputs available in turn.

The decisions of the planner end up in ``node.meta["adacc"]``.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from adacc_compiler.passes import _torch as tp

log = logging.getLogger(__name__)

__all__ = [
    "JointGraphInfo", "analyze_joint_graph", "tensor_nbytes", "detect_layers", "storage_key", "is_alias", "draws_random",
]


def tensor_nbytes(val: object) -> int:
    """Bytes of a tensor value (0 for non-tensors); symbolic sizes use their hint."""
    if not isinstance(val, torch.Tensor):
        return 0
    return tp.int_hint(val.numel(), fallback=4096) * val.dtype.itemsize


def is_alias(node: fx.Node) -> bool:
    """True for ops whose output shares its input's storage (views)."""
    target = node.target
    if target is torch.ops.aten._unsafe_view.default:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in target._schema.returns)
    return False


def _view_base(node: fx.Node) -> fx.Node:
    """The node whose storage a chain of single-output views ends in."""
    while node.op == "call_function" and is_alias(node) and node.args and isinstance(node.meta.get("val"), torch.Tensor):
        base = node.args[0]
        if not isinstance(base, fx.Node) or not isinstance(base.meta.get("val"), torch.Tensor):
            break
        node = base
    return node


def storage_key(node: fx.Node) -> object:
    """Identity of the storage a node's value lives in (views share their base's).

    A view is keyed by the node its view chain starts from, not by its fake
    value's storage: a decomposition that replaces a node gives it a fresh
    fake value, and the views traced from the old one keep the old storage
    (in a Llama joint graph, the ``expand`` feeding attention's second
    ``bmm`` looked like a 1 MiB storage of its own beside the softmax it
    views).
    """
    node = _view_base(node)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return torch.multiprocessing.reductions.StorageWeakRef(val.untyped_storage())
        except Exception:  # symbolic or exotic tensors: treat as their own storage
            return node
    return node


def draws_random(node: torch.fx.Node) -> bool:
    """Whether running ``node`` draws from the RNG.

    True for ops tagged ``nondeterministic_seeded``, except attention kernels
    called with ``dropout_p=0``: they carry the tag for their dropout alone.
    """
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    for i, arg in enumerate(target._schema.arguments):
        if arg.name == "dropout_p":
            if arg.name in node.kwargs:
                p = node.kwargs[arg.name]
            elif i < len(node.args):
                p = node.args[i]
            else:
                p = arg.default_value
            return not (isinstance(p, (int, float)) and p == 0)
    return True


def _not_recomputable_reason(node: fx.Node) -> str | None:
    """Why the backward may not recompute this node, or None if it may."""
    if node.op != "call_function":
        return "not an op"
    recompute_tag = node.meta.get("recompute")
    if recompute_tag is not None and recompute_tag in (
        torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE,
        torch.utils.checkpoint.CheckpointPolicy.PREFER_SAVE,
    ):
        return "tagged save by the user"
    if draws_random(node):
        return "random op"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable:
            return "mutates its inputs"
        if target.namespace in ("_c10d_functional", "c10d_functional", "_dtensor"):
            return "collective"
    elif isinstance(target, torch._ops.HigherOrderOperator):
        return "higher-order op"
    if tp._must_be_in_forward(node):
        return "must run in the forward"
    if node.target is operator.getitem:
        parent = node.args[0]
        if isinstance(parent, fx.Node) and _not_recomputable_reason(parent) is not None:
            return "output of a non-recomputable op"
    return None


@dataclass
class JointGraphInfo:
    """What the planner needs to know about one joint graph."""

    gm: fx.GraphModule
    num_fwd_outputs: int
    node_info: tp.NodeInfo
    order: dict[fx.Node, int]  # position in the joint graph
    primals: list[fx.Node]
    param_primals: set[fx.Node]  # static-lifetime inputs: parameters and buffers
    fw_nodes: list[fx.Node]  # forward-computable call_function nodes, joint order
    bw_nodes: list[fx.Node]  # backward nodes, joint order
    boundary: list[fx.Node]  # forward-computable values (and primals) read by the backward
    candidates: list[fx.Node]  # forward-computable nodes that may need to be available
    not_recomputable: dict[fx.Node, str]  # candidate -> reason
    nbytes: dict[fx.Node, int]
    bw_pos: dict[fx.Node, int]  # backward node -> index in the backward schedule
    param_aliases: set[fx.Node] = field(default_factory=set)  # views of parameters
    layer_of: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # -> (layer, slot)
    num_layers: int = 0
    layer_period: int = 0

    def is_fw(self, node: fx.Node) -> bool:
        return node in self._fw_set

    def __post_init__(self) -> None:
        self._fw_set = set(self.fw_nodes)

    @property
    def param_primal_names(self) -> set[str]:
        return {p.name for p in self.param_primals}


def analyze_joint_graph(
    gm: fx.GraphModule, *, num_fwd_outputs: int, static_lifetime_input_indices: list[int] | None
) -> JointGraphInfo:
    """Classify the nodes of a (prepared) joint graph."""
    static = list(static_lifetime_input_indices or [])
    node_info = tp.classify_nodes(gm, static, num_fwd_outputs)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    primals = [n for n in nodes if n.op == "placeholder" and tp._is_primal(n)]
    static_set = set(static)
    param_primals = {p for i, p in enumerate(primals) if i in static_set}

    # Backward nodes: the tangents' closure plus whatever must run in the backward.
    backward: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder":
            if tp._is_tangent(n):
                backward.add(n)
            continue
        if n.op == "output":
            continue
        if tp._must_be_in_backward(n) or any(a in backward for a in n.all_input_nodes):
            backward.add(n)
    fw_nodes = [n for n in nodes if n.op == "call_function" and n not in backward]
    bw_nodes = [n for n in nodes if n.op == "call_function" and n in backward]
    fw_set = set(fw_nodes)
    bw_pos = {n: i for i, n in enumerate(bw_nodes)}

    boundary_set: set[fx.Node] = set()
    for b in bw_nodes:
        for a in b.all_input_nodes:
            if a in fw_set or (a.op == "placeholder" and tp._is_primal(a)):
                boundary_set.add(a)
    # A backward output that does not depend on the tangents (e.g. a zero
    # gradient) is forward-computable yet must be available to the backward.
    outputs = gm.graph.output_node().args[0]
    for a in list(outputs)[num_fwd_outputs:] if isinstance(outputs, (list, tuple)) else []:
        if isinstance(a, fx.Node) and (a in fw_set or (a.op == "placeholder" and tp._is_primal(a))):
            boundary_set.add(a)
    boundary = sorted(boundary_set, key=order.__getitem__)

    # Candidates: forward-computable nodes upstream of the boundary.
    upstream: set[fx.Node] = set()
    stack = [b for b in boundary if b in fw_set]
    while stack:
        n = stack.pop()
        if n in upstream:
            continue
        upstream.add(n)
        stack.extend(a for a in n.all_input_nodes if a in fw_set)
    candidates = sorted(upstream, key=order.__getitem__)

    not_recomputable = {}
    for c in candidates:
        reason = _not_recomputable_reason(c)
        if reason is not None:
            not_recomputable[c] = reason
    # A value aliasing a parameter (e.g. a transposed weight) costs no
    # activation memory whether it is saved or not.
    param_storages = {storage_key(p) for p in param_primals}
    nbytes = {}
    param_aliases = set()
    for c in [*candidates, *primals]:
        val = c.meta.get("val")
        if storage_key(c) in param_storages:
            nbytes[c] = 0
            if c.op == "call_function":
                param_aliases.add(c)
        else:
            nbytes[c] = tensor_nbytes(val)

    info = JointGraphInfo(
        gm=gm,
        num_fwd_outputs=num_fwd_outputs,
        node_info=node_info,
        order=order,
        primals=primals,
        param_primals=param_primals,
        fw_nodes=fw_nodes,
        bw_nodes=bw_nodes,
        boundary=boundary,
        candidates=candidates,
        not_recomputable=not_recomputable,
        nbytes=nbytes,
        bw_pos=bw_pos,
        param_aliases=param_aliases,
    )
    detect_layers(info)
    log.debug(
        "joint graph: %d forward nodes, %d backward nodes, %d boundary values, %d candidates, "
        "%d not recomputable, %d layers of %d nodes",
        len(fw_nodes),
        len(bw_nodes),
        len(boundary),
        len(candidates),
        len(not_recomputable),
        info.num_layers,
        info.layer_period,
    )
    return info


def _describe(val: object) -> object:
    if isinstance(val, torch.Tensor):
        return (tuple(str(s) for s in val.shape), str(val.dtype))
    if isinstance(val, (list, tuple)):
        return tuple(_describe(v) for v in val)
    return type(val).__name__


def _signature(node: fx.Node) -> int:
    """A name-free fingerprint of a forward node and the nodes it reads.

    Inputs are described by what they are (op, shape, dtype), not by where
    they are, so the same op wired the same way in two repeated blocks gets the
    same signature even when it also reads values shared by all blocks (rotary
    tables, masks) that sit at different distances from each block.
    """
    args = tuple(
        (a.op, str(a.target) if a.op == "call_function" else "", _describe(a.meta.get("val")))
        for a in node.all_input_nodes
    )
    consts = tuple(
        repr(x) for x in (*node.args, *node.kwargs.values()) if not isinstance(x, (fx.Node, list, tuple))
    )
    return hash((str(node.target), _describe(node.meta.get("val")), args, consts))


def detect_layers(info: JointGraphInfo, *, min_period: int = 4) -> None:
    """Find the repeated block in the forward by its structure.

    Looks for the period P whose shifted signature sequence matches over the
    longest stretch (at least two full periods). Nodes in that stretch get
    ``(layer, slot)``: slot ``j`` of layer ``l`` corresponds to slot ``j`` of
    every other layer.
    """
    fw = [n for n in info.fw_nodes if n in info.node_info._required_fw_nodes]
    n = len(fw)
    if n < 2 * min_period:
        return
    sig = np.array([_signature(node) for node in fw], dtype=np.int64)
    best = (0, 0, 0)  # (covered nodes, period, start)
    for period in range(min_period, n // 2 + 1):
        eq = sig[:-period] == sig[period:]
        if not eq.any():
            continue
        # Longest run of consecutive matches.
        padded = np.concatenate(([False], eq, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        starts, ends = edges[::2], edges[1::2]
        lengths = ends - starts
        k = int(lengths.argmax())
        run = int(lengths[k])
        if run < period:
            continue
        covered = (run + period) // period * period
        if covered > best[0]:
            best = (covered, period, int(starts[k]))
    covered, period, start = best
    if period == 0:
        return
    num_layers = covered // period
    for i in range(covered):
        info.layer_of[fw[start + i]] = (i // period, i % period)
    info.num_layers = num_layers
    info.layer_period = period
    _extend_layers(info)


def _extend_layers(info: JointGraphInfo) -> None:
    """Give layers to the forward-computable values the backward computes from one layer.

    A decomposed backward formula computes some values from forward values
    only (the ``sigmoid`` of a SiLU's input, say): they are candidates like any
    forward value, but they sit outside the forward's repeated stretch. One
    that reads values of a single layer (besides values outside every layer)
    gets that layer, and a slot after the forward's keyed by its op and the
    slots it reads; a key that is not found exactly once in every layer gets
    no slot, so twins are always the same op wired the same way.
    """
    found: dict[tuple, dict[int, list[fx.Node]]] = {}
    slots: dict[fx.Node, tuple] = {}
    for c in info.candidates:
        if c in info.layer_of or c.op != "call_function":
            continue
        layers = {info.layer_of[a][0] for a in c.all_input_nodes if a in info.layer_of}
        if len(layers) != 1:
            continue
        reads = tuple(
            slots[a] if a in slots else info.layer_of[a][1] if a in info.layer_of else -1 for a in c.all_input_nodes
        )
        key = (_signature(c), reads)
        (layer,) = layers
        found.setdefault(key, {}).setdefault(layer, []).append(c)
        # Later values may read this one: it takes part in their keys.
        info.layer_of[c] = (layer, -1)
        slots[c] = key
    next_slot = info.layer_period
    for key, by_layer in found.items():
        unique = len(by_layer) == info.num_layers and all(len(v) == 1 for v in by_layer.values())
        for layer, nodes in by_layer.items():
            for c in nodes:
                if unique:
                    info.layer_of[c] = (layer, next_slot)
                else:
                    del info.layer_of[c]
        if unique:
            next_slot += 1
