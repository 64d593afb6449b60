"""Liveness: the activation-memory timeline of a forward+backward schedule.

Two views of the same quantity:

* :func:`simulate_partition` is exact: it walks the partitioned forward and
  backward graphs event by event and counts the bytes of every storage that
  holds a value the backward needs (saved by the forward, or recomputed or
  decoded in the backward), from its allocation to its last use. Views share their base's
  storage and are counted once; parameters and buffers are never counted.
  Every plan is checked with it before it is used.
* :func:`model_intervals` is the linear model the MILP uses: for each candidate
  value, the backward interval it occupies if retained or if recomputed.

Both count a recomputed pointwise value that Inductor fuses into its readers
(:func:`fuses_into_users`) as holding no memory: Inductor computes it inside
the kernels that read it.

The dependency structure is held in a networkx DiGraph (:func:`dependency_graph`),
which the rewrite also uses to check that a plan is closed (every recomputed
value's inputs are available).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from adacc_compiler.passes import _torch as tp
from adacc_compiler.passes.classify import JointGraphInfo, is_alias, storage_key, tensor_nbytes
from adacc_compiler.plan import MemoryTimeline

__all__ = [
    "simulate_partition",
    "simulate",
    "model_intervals",
    "Intervals",
    "dependency_graph",
    "saved_names",
    "fuses_into_users",
    "partition_choices",
]


def _storage_nbytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            nbytes = val.untyped_storage().nbytes()
            if isinstance(nbytes, int):
                return nbytes
        except Exception:
            pass
    return tensor_nbytes(val)


def _is_broadcast_view(node: fx.Node) -> bool:
    """A view with a stride-0 dimension (an expand).

    Inductor may materialise such a value when a graph returns it, so a saved
    broadcast view is counted at its dense size in a storage of its own (the
    planner never chooses to save one; this covers partitions it does not make).
    """
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or node.op != "call_function":
        return False
    try:
        return any(st == 0 and sz != 1 for st, sz in zip(val.stride(), val.shape))
    except Exception:
        return False


def saved_storage(node: fx.Node) -> tuple[object, int]:
    """(storage identity, bytes) of a value the forward saves for the backward."""
    if _is_broadcast_view(node):
        return node, tensor_nbytes(node.meta.get("val"))
    return storage_key(node), _storage_nbytes(node)


def saved_names(bw_gm: fx.GraphModule) -> list[str]:
    """Names of the values the backward receives from the forward, in order."""
    return [n.name for n in bw_gm.graph.find_nodes(op="placeholder") if not tp._is_tangent(n)]


def simulate_partition(
    fw_gm: fx.GraphModule,
    bw_gm: fx.GraphModule,
    *,
    param_names: set[str],
    forward_names: set[str],
) -> MemoryTimeline:
    """Exact activation-memory timeline of a partitioned forward and backward.

    Args:
        param_names: placeholders that are parameters or buffers (never counted).
        forward_names: names of the joint graph's forward-computable nodes; a
            backward node with one of these names is a recomputed value.
    """
    saved = set(saved_names(bw_gm)) - param_names
    # Views of parameters hold no activation memory.
    param_keys = {storage_key(n) for n in fw_gm.graph.find_nodes(op="placeholder") if n.name in param_names}
    labels: list[str] = []
    phases: list[str] = []
    live: list[int] = []

    # Forward: a saved storage is live from the first node that allocates it.
    fw_events = [n for n in fw_gm.graph.nodes if n.op in ("placeholder", "call_function")]
    first_alloc: dict[object, int] = {}
    size: dict[object, int] = {}
    for i, n in enumerate(fw_events):
        key = storage_key(n)
        first_alloc.setdefault(key, i)
    saved_keys: dict[object, int] = {}
    for n in fw_events:
        if n.name in saved and isinstance(n.meta.get("val"), torch.Tensor):
            if storage_key(n) in param_keys:
                continue
            key, nbytes = saved_storage(n)
            saved_keys[key] = first_alloc.get(key, first_alloc[storage_key(n)])
            size[key] = max(size.get(key, 0), nbytes)
    starts = sorted(saved_keys.items(), key=lambda kv: kv[1])
    total = 0
    k = 0
    for i, n in enumerate(fw_events):
        while k < len(starts) and starts[k][1] <= i:
            total += size[starts[k][0]]
            k += 1
        if n.op == "call_function":
            labels.append(n.name)
            phases.append("forward")
            live.append(total)
    if not labels:  # a forward of placeholders only still saves its inputs
        labels.append("forward")
        phases.append("forward")
        live.append(total)

    # Backward: saved storages live until their last use; recomputed values
    # from their allocation to their last use.
    bw_nodes = list(bw_gm.graph.nodes)
    pos = {n: i for i, n in enumerate(bw_nodes)}
    intervals: dict[object, list[int]] = {}
    bw_size: dict[object, int] = {}

    def recomputed(n: fx.Node) -> bool:
        # A decoded value, and a value rebuilt from one, is held like a
        # recomputed one: from its decode (rebuild) on.
        return n.op == "call_function" and (
            n.name in forward_names or "adacc_decompress" in n.meta or "adacc_recompute_of" in n.meta
        )

    # Storages Inductor never allocates: recomputed values fused into their
    # readers (and the views of them, whose readers are fusible too).
    fused_nodes = {n for n in bw_nodes if recomputed(n) and fuses_into_users(n)}
    fused = {storage_key(n) for n in fused_nodes}
    # A fused value is computed where its readers run, so what it reads is
    # read there too: each node's last effective read position.
    reads_at: dict[fx.Node, int] = {}
    for n in reversed(bw_nodes):
        if n in fused_nodes:
            reads_at[n] = max((reads_at.get(u, pos[u]) for u in n.users), default=pos[n])
    for n in bw_nodes:
        is_saved = n.op == "placeholder" and n.name in saved
        is_recomputed = recomputed(n)
        if not (is_saved or is_recomputed) or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        if is_recomputed and storage_key(n) in fused:
            continue
        if storage_key(n) in param_keys:
            continue
        key, nbytes = saved_storage(n) if is_saved else (storage_key(n), _storage_nbytes(n))
        start = -1 if is_saved else pos[n]
        end = max((reads_at.get(u, pos[u]) for u in n.users if u.op != "output"), default=start)
        if any(u.op == "output" for u in n.users):
            end = len(bw_nodes)
        iv = intervals.setdefault(key, [start, end])
        iv[0] = min(iv[0], start)
        iv[1] = max(iv[1], end)
        bw_size[key] = max(bw_size.get(key, 0), nbytes)
    delta = [0] * (len(bw_nodes) + 2)
    base = 0
    for key, (start, end) in intervals.items():
        if start < 0:
            base += bw_size[key]
        else:
            delta[start] += bw_size[key]
        delta[min(end, len(bw_nodes)) + 1] -= bw_size[key]
    running = base
    for i, n in enumerate(bw_nodes):
        running += delta[i]
        if n.op == "call_function":
            labels.append(n.name)
            phases.append("backward")
            live.append(running)
    return MemoryTimeline(labels=labels, phases=phases, live_bytes=live)


def partition_choices(info: JointGraphInfo, bw_gm: fx.GraphModule) -> tuple[set[str], set[str]]:
    """Names of the values a partition saves and of those its backward recomputes."""
    forward = {n.name for n in info.fw_nodes}
    recomputed = {n.name for n in bw_gm.graph.nodes if n.op == "call_function" and n.name in forward}
    return set(saved_names(bw_gm)), recomputed


def simulate(info: JointGraphInfo, fw_gm: fx.GraphModule, bw_gm: fx.GraphModule) -> MemoryTimeline:
    """:func:`simulate_partition` of a split of ``info``'s joint graph."""
    return simulate_partition(
        fw_gm, bw_gm, param_names=info.param_primal_names, forward_names={n.name for n in info.fw_nodes}
    )


def dependency_graph(info: JointGraphInfo) -> nx.DiGraph:
    """The forward-computable dependency DAG (candidates and the primals they read)."""
    g = nx.DiGraph()
    cand = set(info.candidates)
    for c in info.candidates:
        g.add_node(c.name)
        for a in c.all_input_nodes:
            if a in cand or a.op == "placeholder":
                g.add_edge(a.name, c.name)
    return g


# Recomputed values are placed just before their first backward reader, in
# dependency order; each step back along a recompute chain moves this much
# earlier on the backward axis (chains are far shorter than 1 / _CHAIN_STEP).
_CHAIN_STEP = 1e-4


def _op_tags(node: fx.Node) -> set:
    """The ATen tags of ``node``'s op (none for anything but an ATen overload call)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return set()
    return set(node.target.tags)


def _fusible_reader(node: fx.Node) -> bool:
    """An op Inductor generates as a loop that can compute its inputs inline.

    Pointwise ops and reductions; a view counts when everything that reads it
    does (an extern kernel reading a view needs the base stored).
    """
    if _op_tags(node) & {torch.Tag.pointwise, torch.Tag.reduction}:
        return True
    return is_alias(node) and bool(node.users) and all(_fusible_reader(u) for u in node.users)


def fuses_into_users(node: fx.Node) -> bool:
    """True for a pointwise value Inductor computes inside its readers' kernels and never stores.

    A recomputed value like this holds no memory of its own: a float32
    cross-entropy chain recomputed over a large vocabulary is one fused kernel
    reading the saved logits, not a run of full-size buffers. Inductor stores
    a pointwise value read by more than ``realize_reads_threshold`` ops, so
    such values, and those read by anything but pointwise ops and reductions
    (matmuls, attention, custom ops, the graph's output), count as stored.
    """
    if torch.Tag.pointwise not in _op_tags(node):
        return False
    from torch._inductor import config as inductor_config

    users = list(node.users)
    return 0 < len(users) <= inductor_config.realize_reads_threshold and all(_fusible_reader(u) for u in users)


@dataclass
class Intervals:
    """Where each candidate lives on the backward axis, and what it occupies.

    The backward axis numbers the backward nodes 0..T-1 in schedule order; a
    saved value lives from -1 (the end of the forward) to ``last_saved[c]``; a
    recomputed one from ``need[c]`` to ``last_recomputed[c]``. ``bytes_saved``
    and ``bytes_recomputed`` are what each choice occupies: a recomputed view
    allocates nothing (its base is accounted for, and kept alive long enough),
    nor does a recomputed value Inductor fuses into its readers; a saved view
    holds its base's storage.
    """

    need: dict[fx.Node, float]
    last_saved: dict[fx.Node, float]
    last_recomputed: dict[fx.Node, float]
    bytes_saved: dict[fx.Node, int]
    bytes_recomputed: dict[fx.Node, int]
    num_bw: int
    # The recomputed user that pulled a value's head before its own first
    # backward reader (only with a tentative recompute set).
    puller: dict[fx.Node, fx.Node] = dataclasses.field(default_factory=dict)
    # (value, user) pairs whose recomputation would pull the value's interval
    # further than the window ahead of its first reader; the MILP charges the
    # extra lifetime only when both are recomputed (see model_intervals).
    far_edges: list[tuple[fx.Node, fx.Node]] = dataclasses.field(default_factory=list)


def model_intervals(
    info: JointGraphInfo, recomputed: set[fx.Node] | None = None, *, window: float | None = None
) -> Intervals:
    """Backward intervals of every candidate.

    A recomputed value must exist from the earliest moment something reads it:
    a backward node, or the recomputation of a forward user. Which users are
    recomputed is the MILP's choice, so:

    * with a tentative ``recomputed`` set the intervals are those of that plan
      (used to judge a plan on its own terms);
    * without one (the MILP's model), every user rebuilt at most ``window``
      backward positions ahead of the value's first reader is assumed to pull
      it (conservative), and users further ahead are *far* (``far_edges``):
      the MILP charges the value's bytes from such a user's rebuild onwards
      only when both are recomputed. Values nothing in the backward reads
      directly are measured from their latest user.
    """
    num_bw = len(info.bw_nodes)
    cand = set(info.candidates)
    output_node = info.gm.graph.output_node()
    need: dict[fx.Node, float] = {}
    last_s: dict[fx.Node, float] = {}
    last_r: dict[fx.Node, float] = {}
    b_s: dict[fx.Node, int] = {}
    b_r: dict[fx.Node, int] = {}
    puller: dict[fx.Node, fx.Node] = {}
    far: list[tuple[fx.Node, fx.Node]] = []
    recomputable = cand - set(info.not_recomputable)
    fused = {c for c in info.candidates if fuses_into_users(c)}
    for c in reversed(info.candidates):
        first = math.inf
        final = -1.0
        direct = False
        users = []
        for u in c.users:
            if u in info.bw_pos:
                first = min(first, float(info.bw_pos[u]))
                final = max(final, float(info.bw_pos[u]))
                direct = True
            elif u is output_node and c in info.boundary:
                first = min(first, float(num_bw - 1))
                final = max(final, float(num_bw - 1))
                direct = True
            elif u in cand:
                users.append(u)
        # Tail: a user rebuilt in the backward reads this value when it is
        # rebuilt. Users sit later in the forward, so earlier in the backward:
        # counting all of them rarely lengthens the interval.
        tail = final
        for u in users:
            if need[u] != math.inf:
                tail = max(tail, need[u])
            if (is_alias(u) or u in fused) and last_r[u] >= 0:
                # A view keeps this storage alive for as long as it lives; a
                # fused user reads it wherever its own readers run.
                tail = max(tail, last_r[u])
        # Head: the earliest reader. Recomputed users pull it earlier; without
        # a tentative set, only a value with no direct reader takes its users'.
        if recomputed is not None:
            # Only recomputed users pull it; a value neither the backward nor a
            # recomputation reads is not needed by this plan at all (a rebuild
            # of it is dead code, which the partition drops).
            pulling = [u for u in users if u in recomputed]
        elif window is None:
            pulling = users
        else:
            # A value nothing reads directly is measured from its latest user.
            ref = first if direct else max((need[u] for u in users if need[u] != math.inf), default=math.inf)
            pulling = []
            for u in users:
                if need[u] == math.inf:
                    continue
                if need[u] >= ref - window:
                    pulling.append(u)
                elif u in recomputable:
                    # (c may also be decoded for u: a compressed checkpoint)
                    far.append((c, u))
        for u in pulling:
            if need[u] < first:
                first = need[u]
                if recomputed is not None:
                    puller[c] = u
        need[c] = first - _CHAIN_STEP if first != math.inf else math.inf
        last_s[c] = tail
        last_r[c] = tail
        size = info.nbytes.get(c, 0)
        if size and is_alias(c):
            b_s[c] = saved_storage(c)[1]
            b_r[c] = 0
        elif size and c in fused:
            b_s[c], b_r[c] = size, 0
        else:
            b_s[c] = b_r[c] = size
    return Intervals(
        need=need,
        last_saved=last_s,
        last_recomputed=last_r,
        bytes_saved=b_s,
        bytes_recomputed=b_r,
        num_bw=num_bw,
        puller=puller,
        far_edges=far,
    )
