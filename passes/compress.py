"""Compression: codec menus per tensor, error measurement, codec insertion.

Three steps, each a function:

1. :func:`tensor_role` names what a value the backward reads *is*, from the
   ops that produce and consume it (followed through views), never from
   module names. The role sets the value's codec **menu** (:data:`MENUS`):

   ============== ==================================================== ==========================
   role           found as                                             codecs offered
   ============== ==================================================== ==========================
   mask           a ``bool`` tensor (ReLU / dropout masks, compares)    ``bool1`` (lossless)
   attention      produced or read by an attention op, or read by a     lossless only
                  batched matmul (Q, K, V, probabilities, output, LSE),
                  or an elementwise function of such a value
   residual       read both by a norm's statistics and by an ``add``    lossless only
                  of its own shape (the residual stream)
   norm_input     read by a norm's statistics (``pow``/``mean``,        ``int8_group``
                  ``var_mean``, a layer-norm op)                        (outlier-aware),
                                                                        ``bf16``
   matmul_input   read by a matrix multiply (``mm``/``addmm``)           ``int8_token``,
                                                                        ``int8_group``,
                                                                        ``int4_group``,
                                                                        ``int12_token``,
                                                                        ``bf16``
   act_input      read by an activation function (``sigmoid``,          ``int8_group``,
                  ``tanh``, ``erf``, ``relu``, ``gelu``, ``silu``)        ``int8_token``,
                                                                        ``int12_token``,
                                                                        ``bf16``
   other          any other floating-point value                        ``int8_group``,
                                                                        ``int8_token``,
                                                                        ``int12_token``,
                                                                        ``bf16``
   ============== ==================================================== ==========================

   Roles are tried in that order; the first that matches wins. With
   ``compress_sensitive`` the attention tensors and the residual stream are
   offered the ``other`` menu as well. Whatever its role, a value made before
   the repeated layers and read in two or more of them (RoPE's ``cos`` /
   ``sin`` tables, attention masks: :func:`shared_layers`) is offered its
   menu's lossless codecs only: one rounding error in it would recur in every
   layer, which the plan's summed noise bound counts once. Values under :data:`MIN_BYTES`,
   non-contiguous values and integer tensors get no codec.

   Besides the values the backward reads, a value only recomputation reads
   (the output of a matrix multiply whose backward reads functions of it,
   such as a SiLU's sigmoid) gets a menu by the same rules as a
   **checkpoint**: stored compressed, the backward rebuilds its readers from
   the decoded copy instead of running the matrix multiply again. Views are
   not checkpoints (their base is), and a checkpoint's codec is offered only
   where it costs less than re-running the value's own op.
2. :func:`measure_menus` runs the forward once on the real inputs (the RNG
   state is restored afterwards) and measures every lossy codec's round trip
   on each value's actual data, and on the values the backward reads that a
   rebuild from the decoded copy would re-make (a softmax's row maximum
   passes its error through ``exp`` amplified): the lowest SQNR counts. A
   codec whose SQNR falls short of ``min_sqnr_db`` is dropped from the menu,
   as is every lossy codec of a value holding inf or NaN.
3. :func:`codecs_inserted` rewrites the joint graph for a plan: ``compress``
   right after the producer in the forward, the payloads saved, ``decompress``
   when the backward first needs the value; the backward's readers take the
   decoded value. A compressed value may also be a recompute source (a
   compressed checkpoint): the recomputed values downstream of it are rebuilt
   in the backward from the decoded copy, by a copy of their forward ops that
   reads it (the forward's own ops keep reading the exact value). The rewrite
   is undone on exit, so one joint graph serves several plans.

   On the GPU the nodes call the codec's ops (fused Triton kernels). On the
   CPU, with round-to-nearest, a codec's plain-PyTorch definition is traced
   and inlined instead where Inductor compiles it exactly
   (:data:`FUSIBLE_CODECS`, :func:`fusible_on`), so Inductor fuses the encode into
   the producer's kernel and the decode into the reader's: one pass over
   memory each, where an opaque op would cost several. Stochastic rounding
   always calls the ops (their noise comes from a seeded generator).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.fx as fx

from adacc_compiler.passes import _torch as tp
from adacc_compiler.passes.classify import JointGraphInfo, is_alias
from adacc_compiler.plan import noise_power

log = logging.getLogger(__name__)

__all__ = [
    "CodecOption",
    "Menu",
    "MENUS",
    "MIN_BYTES",
    "SENSITIVE_ROLES",
    "tensor_role",
    "codec_menus",
    "shared_layers",
    "measure_menus",
    "sqnr_db",
    "codecs_inserted",
    "inlined_neighbours",
]

aten = torch.ops.aten

# Smaller values are not worth an encode and a decode.
MIN_BYTES = 4096

MENUS: dict[str, tuple[str, ...]] = {
    "mask": ("bool1",),
    "attention": (),
    "residual": (),
    "norm_input": ("int8_group", "bf16"),
    "matmul_input": ("int8_token", "int8_group", "int4_group", "int12_token", "bf16"),
    "act_input": ("int8_group", "int8_token", "int12_token", "bf16"),
    "other": ("int8_group", "int8_token", "int12_token", "bf16"),
}
SENSITIVE_ROLES = ("attention", "residual")

_RULES = {
    "mask": "boolean tensor: 1-bit packing",
    "attention": "read by attention's backward: lossless only",
    "residual": "residual stream: lossless only",
    "norm_input": "norm input: per-group int8 with outlier channels kept exact, bfloat16",
    "matmul_input": "matmul input: per-token / per-group int8, per-group int4, per-token int12, bfloat16",
    "act_input": "activation-function input: per-group / per-token int8, per-token int12, bfloat16",
    "other": "floating-point value: per-group / per-token int8, per-token int12, bfloat16",
}

_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.clone.default,
    aten.alias.default,
    aten.slice.Tensor,
    aten.select.int,
}
_MATMULS = {aten.mm.default, aten.addmm.default}
_BATCHED_MATMULS = {aten.bmm.default, aten.baddbmm.default}
_NORM_STATS = {aten.var_mean.correction, aten.var_mean.dim, aten.native_layer_norm.default, aten.mean.dim}
_ACTIVATIONS = {
    aten.sigmoid.default,
    aten.tanh.default,
    aten.erf.default,
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
}


@dataclass(frozen=True)
class CodecOption:
    """One codec a value may take, with what it costs."""

    codec: str
    nbytes: int  # payload bytes
    cost_s: float  # encode + decode time per step
    sqnr_db: float | None = None  # measured on the actual values; None for lossless codecs

    @property
    def noise(self) -> float:
        """Quantisation noise power relative to the value's power (0 for a lossless codec)."""
        return 0.0 if self.sqnr_db is None else noise_power(self.sqnr_db)


@dataclass
class Menu:
    """The codecs one value may take and why."""

    role: str
    rule: str
    codecs: list[str]
    sqnr_db: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # codec -> why it was dropped
    # Not read by the backward: only worth storing as a recompute source.
    checkpoint: bool = False


def _is_attention_op(target: object) -> bool:
    name = str(target)
    return any(k in name for k in ("scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention"))


def _is_norm_stat(node: fx.Node) -> bool:
    if node.target in _NORM_STATS:
        return True
    # RMSNorm decomposes to x.pow(2).mean(-1).
    return node.target is aten.pow.Tensor_Scalar and any(u.target is aten.mean.dim for u in node.users)


def _consumers(node: fx.Node) -> list[fx.Node]:
    """The non-view ops that read ``node``, looking through views."""
    out, stack, seen = [], list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "call_function" and u.target in _VIEWS:
            stack.extend(u.users)
        else:
            out.append(u)
    return out


def _producer(node: fx.Node) -> fx.Node:
    """The op that made ``node``'s data, looking back through views and getitem."""
    while node.op == "call_function" and (node.target in _VIEWS or node.target is operator.getitem):
        if not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


def _attention_like(node: fx.Node, *, depth: int) -> bool:
    """Made by or fed to attention (or a batched matmul), or an elementwise function of such a value."""
    producer = _producer(node)
    if producer.op == "call_function" and _is_attention_op(producer.target):
        return True
    if any(u.op == "call_function" and (_is_attention_op(u.target) or u.target in _BATCHED_MATMULS) for u in _consumers(node)):
        return True
    if depth == 0 or producer.op != "call_function":
        return False
    shape = getattr(node.meta.get("val"), "shape", None)
    return any(
        getattr(a.meta.get("val"), "shape", None) == shape and _attention_like(a, depth=depth - 1)
        for a in producer.all_input_nodes
    )


def tensor_role(node: fx.Node) -> str:
    """The role of a value (see the module docstring for the rules)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "none"
    if val.dtype == torch.bool:
        return "mask"
    if not val.dtype.is_floating_point:
        return "none"
    consumers = _consumers(node)
    if _attention_like(node, depth=2):
        return "attention"
    reads_norm = any(u.op == "call_function" and _is_norm_stat(u) for u in consumers)
    if reads_norm and any(
        u.target is aten.add.Tensor and getattr(u.meta.get("val"), "shape", None) == val.shape for u in consumers
    ):
        return "residual"
    if reads_norm:
        return "norm_input"
    if any(u.target in _MATMULS for u in consumers):
        return "matmul_input"
    if any(u.target in _ACTIVATIONS for u in consumers):
        return "act_input"
    return "other"


def _compressible(info: JointGraphInfo, node: fx.Node, *, recomputable: set[fx.Node] | None = None) -> str | None:
    """Why ``node`` takes no codec at all, or None.

    With ``recomputable`` (the candidates the backward may rebuild), ``node``
    is judged as a compressed checkpoint only: a value the backward does not
    read itself but may rebuild recomputable values from.
    """
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "not a tensor"
    if node.op != "call_function" or node in info.param_aliases:
        return "an input or a view of a parameter"
    if info.nbytes.get(node, 0) < MIN_BYTES:
        return f"smaller than {MIN_BYTES} bytes"
    if not all(isinstance(s, int) for s in val.shape):
        return "dynamic shape"
    if not val.is_contiguous() and not all(
        u.target in _MATMULS or u.target in _BATCHED_MATMULS for u in node.users if u in info.bw_pos
    ):
        # A decoded value is contiguous; matrix multiplies produce the same
        # result from either layout, other readers might not.
        return "not contiguous and read by more than matrix multiplies"
    if any(u.op == "output" for u in node.users):
        return "returned by the graph"
    if recomputable is not None:
        if is_alias(node):
            # A view rebuilds for free from its base; the base is the one to store.
            return "a view"
        if not any(u in recomputable for u in node.users):
            return "nothing recomputable reads it"
        return None
    if not any(u in info.bw_pos for u in node.users):
        return "not read by the backward"
    return None


def codec_menus(info: JointGraphInfo, *, mode: str, sensitive: bool, checkpoints: bool = True) -> dict[fx.Node, Menu]:
    """The codec menu of every value the backward reads (before error checks),
    and of every compressed-checkpoint candidate.

    A checkpoint candidate is a value the backward does not read but may
    rebuild recomputed values from (the output of a matrix multiply whose
    readers are cheap elementwise ops, say): storing it compressed spares
    re-running its producer. Its role and menu follow the same rules.

    ``mode`` is the ``compress`` option: ``"lossy"``, ``"lossless"`` or
    ``"off"``; ``checkpoints`` the ``compress_checkpoints`` option.
    """
    from adacc_compiler.triton_kernels import CODECS

    menus: dict[fx.Node, Menu] = {}
    if mode == "off":
        return menus
    boundary = set(info.boundary)
    recomputable = set(info.candidates) - set(info.not_recomputable)
    for node in info.candidates:
        if node.op != "call_function":
            continue
        source = node not in boundary
        if source and not checkpoints:
            continue
        if _compressible(info, node, recomputable=recomputable if source else None) is not None:
            continue
        role = tensor_role(node)
        if role == "none":
            continue
        names = list(MENUS[role])
        rule = _RULES[role]
        if sensitive and role in SENSITIVE_ROLES:
            names = list(MENUS["other"])
            rule = f"{role}, lossy codecs allowed by compress_sensitive"
        shared = shared_layers(info, node)
        if shared:
            rule = (
                f"{rule}; made before the layers and read in layers {shared[0]}-{shared[-1]}: "
                "lossless only (one rounding error would recur in every layer)"
            )
        if source:
            rule = f"{rule}; checkpoint (the backward rebuilds its readers from it)"
        val = node.meta["val"]
        offered = []
        for name in names:
            codec = CODECS.get(name)
            if codec is None or not codec.supports(tuple(val.shape), val.dtype):
                continue
            if (mode == "lossless" or shared) and not codec.lossless:
                continue
            offered.append(name)
        menus[node] = Menu(role=role, rule=rule, codecs=offered, checkpoint=source)
    return menus


def shared_layers(info: JointGraphInfo, node: fx.Node) -> list[int]:
    """The layers that read ``node`` if no trainable parameter is upstream of it and two or more layers read it.

    Such a value is made from the batch and buffers alone, before the
    repeated layers (RoPE's ``cos``/``sin`` tables, an attention mask), and
    is the same tensor in every layer, so a codec's rounding error in it is
    not independent noise per layer but one error repeated coherently in
    each; the plan's summed noise bound would count it once. Readers are
    followed through views (:func:`_consumers`); an empty list for anything
    else.
    """
    if node in info.layer_of:
        return []
    layers = sorted({info.layer_of[u][0] for u in _consumers(node) if u in info.layer_of})
    if len(layers) < 2 or _has_trainable_ancestor(info, node):
        return []
    return layers


def _has_trainable_ancestor(info: JointGraphInfo, node: fx.Node) -> bool:
    """Whether a primal the joint graph returns a gradient for (its outputs after the forward's) is upstream."""
    (output,) = info.gm.graph.find_nodes(op="output")
    grads = list(output.args[0])[info.num_fwd_outputs :]
    trainable = {p for p, g in zip(info.primals, grads) if g is not None}
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in trainable:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``y`` as an approximation of ``x``, in dB."""
    # Two fused reductions (norms accumulate in double on the CPU), no
    # temporaries: measuring every codec on every value the backward reads
    # runs this thousands of times.
    x, y = x.detach(), y.detach()
    wide = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(wide), y.to(wide)
    noise = torch.dist(x, y).item() ** 2
    signal = torch.linalg.vector_norm(x).item() ** 2
    if noise == 0.0:
        return math.inf
    ratio = signal / noise
    if not ratio > 0.0:
        # No signal, or a decode that overflowed (noise inf), or NaN.
        return -math.inf
    return 10.0 * math.log10(ratio)


def _measure_order(info: JointGraphInfo) -> list[fx.Node]:
    """The forward nodes in the order a measurement runs them.

    The joint graph places the ops only the backward reads (a SiLU's
    ``sigmoid`` and ``1 - sigmoid``, kept for its gradient) at the end of the
    forward. A codec's rebuilt values include them, so measured in that order
    every value they are made from is held across the whole forward: on the
    training Llama a check then peaked at 3x the step's own activation
    memory. Such nodes (those the forward's own outputs do not depend on)
    run right after their latest input instead; the rest keeps its order.
    """
    fw = info.fw_nodes
    index = {n: i for i, n in enumerate(fw)}
    movable = {n for n in fw if not info.node_info.is_required_fw(n)}
    key: dict[fx.Node, int] = {}
    for n in fw:
        if n in movable:
            key[n] = max((key.get(a, index.get(a, -1)) for a in n.all_input_nodes), default=-1)
        else:
            key[n] = index[n]
    # A movable node's inputs sort before it (equal keys fall back to the
    # original order); a required node reads only required ones.
    return sorted(fw, key=lambda n: (key[n], index[n]))


def _run_forward(
    info: JointGraphInfo, order: Sequence[fx.Node], primals: Sequence[torch.Tensor], hold: dict[fx.Node, int]
) -> Iterator[tuple[int, dict[fx.Node, object]]]:
    """Run the joint graph's forward nodes, in ``order``, on real inputs; yield ``(i, env)`` after each node.

    ``env`` maps the nodes computed so far to their values. A value is freed
    after its last forward reader, or after position ``hold[node]`` where
    that is later, so memory stays near what the forward itself holds.
    """
    env: dict[fx.Node, object] = dict(zip(info.primals, primals))
    last_use: dict[fx.Node, int] = {n: i for i, n in enumerate(order)}
    for n, at in hold.items():
        last_use[n] = max(at, last_use.get(n, -1))
    for i, n in enumerate(order):
        for a in n.all_input_nodes:
            last_use[a] = max(i, last_use.get(a, -1))
    # Freed by position, not when a reader runs: a value held past its last
    # reader (for a rebuild closure) has no reader left to free it.
    frees: dict[int, list[fx.Node]] = {}
    for a, at in last_use.items():
        if a.op != "placeholder":
            frees.setdefault(at, []).append(a)
    for i, n in enumerate(order):
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
        env[n] = n.target(*args, **kwargs)
        yield i, env
        for a in frees.get(i, ()):
            env.pop(a, None)


# How many ops deep a rebuild from a decoded value is followed when its error is measured.
_REBUILD_DEPTH = 6
# How far along the forward (in measurement order) it is followed: every value
# between a compressed value and its closure's end is held while measuring.
# Unbounded, the residual stream's closures spanned three layers, and a
# measurement of the training Llama peaked at 65 MiB against the step's 36.
_REBUILD_SPAN = 64


def _rebuild_closure(
    order: Sequence[fx.Node], node: fx.Node, fw_index: dict[fx.Node, int], boundary: set[fx.Node]
) -> list[fx.Node]:
    """The forward ops downstream of ``node`` that a rebuild from its decoded copy may re-run.

    Followed in ``order`` (the forward, topologically sorted) through elementwise and reduction ops, up to
    :data:`_REBUILD_DEPTH` ops deep (views are free). Matrix multiplies,
    attention and random ops end the walk: a matrix multiply carries a relative
    error through about unchanged, and a random op re-run would differ by more
    than the codec. Returns, in forward order and ``node`` first, the ops on a
    path to a value the backward reads (``boundary``).
    """
    depth = {node: 0}
    closure = [node]
    # Past the last reader of anything in the closure, nothing more can join.
    horizon = max((fw_index.get(u, -1) for u in node.users), default=-1)
    # A measurement holds every value between the head and the closure's end.
    horizon_cap = fw_index[node] + _REBUILD_SPAN
    for u in order[fw_index[node] + 1 :]:
        if fw_index[u] > min(horizon, horizon_cap):
            break
        ins = [a for a in u.all_input_nodes if a in depth]
        if not ins or u.op != "call_function":
            continue
        target = u.target
        if isinstance(target, torch._ops.OpOverload) and (
            target in _LIBRARY_KERNELS
            or _is_attention_op(target)
            or torch.Tag.nondeterministic_seeded in target.tags
        ):
            continue
        d = max(depth[a] for a in ins) + (0 if target in _VIEWS or target is operator.getitem else 1)
        if d > _REBUILD_DEPTH:
            continue
        depth[u] = d
        closure.append(u)
        horizon = max([horizon, *(fw_index.get(w, -1) for w in u.users)])
    # Only ops on a path to a value the backward reads matter.
    wanted: set[fx.Node] = set()
    for u in reversed(closure[1:]):
        if u in boundary or any(w in wanted for w in u.users):
            wanted.add(u)
    return [node] + [u for u in closure[1:] if u in wanted]


def _rebuilt_sqnr(
    closure: list[fx.Node], decoded: torch.Tensor, env: dict[fx.Node, object], boundary: set[fx.Node]
) -> float:
    """The lowest SQNR among the values the backward reads that a rebuild from ``decoded`` re-makes.

    ``closure[0]`` is the compressed value, replaced by ``decoded``; the other
    ops of ``closure`` are re-run on it. Which of them a plan re-runs and
    which it keeps exactly is not known yet, and a mix is what hurts most: a
    softmax re-run from a decoded row maximum but divided by the exact row
    sum is off by the factor ``exp(error)``. So the closure runs twice: every
    op re-run, and the small values (row statistics, a sixteenth of the
    closure's largest value or less, cheap for a plan to keep) kept exact;
    the second run re-makes only what depends on those. A value the backward
    reads through a view is measured at the view's base (the same error).
    ``inf`` when the closure re-makes no value the backward reads.
    """
    head = closure[0]
    if len(closure) == 1:
        return math.inf
    members = set(closure)

    def view_base(u: fx.Node) -> fx.Node:
        # Through views only: a multi-output op's items are measured themselves.
        while u.target in _VIEWS and isinstance(u.args[0], fx.Node) and u.args[0] in members:
            u = u.args[0]
        return u

    measured = {view_base(u) for u in closure[1:] if u in boundary} - {head}
    largest = max(v.numel() for u in closure if isinstance(v := env[u], torch.Tensor))
    small = {u for u in closure[1:] if isinstance(v := env[u], torch.Tensor) and v.numel() * 16 <= largest}
    worst = math.inf

    def run(u: fx.Node, arg) -> object:
        nonlocal worst
        args, kwargs = fx.node.map_arg((u.args, u.kwargs), arg)
        value = u.target(*args, **kwargs)
        if u in measured and isinstance(value, torch.Tensor) and value.is_floating_point():
            worst = min(worst, sqnr_db(env[u], value))
        return value

    every: dict[fx.Node, object] = {head: decoded}
    for u in closure[1:]:
        every[u] = run(u, lambda a: every.get(a, env[a]))
    mixed: dict[fx.Node, object] = {}
    for u in closure[1:]:
        if u not in small and any(a in small or a in mixed for a in u.all_input_nodes):
            mixed[u] = run(u, lambda a: env[a] if a in small else mixed.get(a, every.get(a, env[a])))
    return worst


def _matches(primals: Sequence[fx.Node], inputs: Sequence[object]) -> bool:
    if len(primals) != len(inputs):
        return False
    for p, x in zip(primals, inputs):
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor) != isinstance(x, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (tuple(x.shape) != tuple(val.shape) or x.dtype != val.dtype):
            return False
    return True


def measure_menus(
    info: JointGraphInfo,
    menus: dict[fx.Node, Menu],
    real_inputs: Sequence[object] | None,
    *,
    min_sqnr_db: float,
    stochastic: bool = False,
) -> str | None:
    """Measure each lossy codec on each value's actual data; drop those that fall short.

    Returns None, or a note saying why no lossy codec could be measured (and
    so none is offered): the real inputs are unknown or do not match the
    graph's inputs. Lossless codecs need no measurement.
    """
    from adacc_compiler.triton_kernels import get_codec

    lossy = {n: m for n, m in menus.items() if any(not get_codec(c).lossless for c in m.codecs)}
    if not lossy:
        return None
    note = None
    if real_inputs is None:
        note = "the real inputs of this graph are unknown, so no lossy codec's error could be measured"
    elif not _matches(info.primals, real_inputs):
        note = "the graph's inputs do not match the example inputs, so no lossy codec's error could be measured"
    if note is not None:
        for m in lossy.values():
            for c in [c for c in m.codecs if not get_codec(c).lossless]:
                m.codecs.remove(c)
                m.excluded[c] = "error not measurable"
        return note
    from torch.utils._python_dispatch import _disable_current_modes

    devices = [x.device for x in real_inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"]
    # Real tensors, whatever fake mode the partitioner runs under; the user's
    # RNG stream is left as it was.
    with _disable_current_modes(), torch.no_grad(), torch.random.fork_rng(
        devices=sorted({d.index or 0 for d in devices})
    ):
        order = _measure_order(info)
        fw_index = {n: i for i, n in enumerate(order)}
        boundary = set(info.boundary)
        closures = {n: _rebuild_closure(order, n, fw_index, boundary) for n in lossy}
        # Each value is measured once its closure has run; its inputs are held until then.
        ready: dict[int, list[fx.Node]] = {}
        hold: dict[fx.Node, int] = {}
        for n, closure in closures.items():
            at = fw_index[closure[-1]]
            ready.setdefault(at, []).append(n)
            # The re-runs read each member's inputs; the head is replaced by
            # its decoded copy, so its own inputs are not needed.
            for u in closure:
                for a in (u, *(u.all_input_nodes if u is not n else ())):
                    hold[a] = max(hold.get(a, -1), at)
        for i, env in _run_forward(info, order, list(real_inputs), hold):
            for node in ready.get(i, ()):
                _measure_value(
                    lossy[node], env[node], closures[node], env, boundary, min_sqnr_db=min_sqnr_db, stochastic=stochastic
                )
    return None


def _measure_value(
    m: Menu,
    value: object,
    closure: list[fx.Node],
    env: dict[fx.Node, object],
    boundary: set[fx.Node],
    *,
    min_sqnr_db: float,
    stochastic: bool,
) -> None:
    """Measure each lossy codec of ``m`` on ``value``; drop those that fall short.

    A codec's SQNR is the lowest of the value's own round trip and of every
    value the backward reads that a rebuild from the decoded copy re-makes
    (:func:`_rebuilt_sqnr`): a value that feeds an ``exp``, such as a
    softmax's row maximum, passes its error on amplified.
    """
    from adacc_compiler.triton_kernels import get_codec

    assert isinstance(value, torch.Tensor), f"adacc internal error: a codec candidate holds {type(value)}"
    finite = bool(torch.isfinite(value).all())
    for c in list(m.codecs):
        codec = get_codec(c)
        if codec.lossless:
            continue
        if not finite:
            m.codecs.remove(c)
            m.excluded[c] = "value holds inf or NaN"
            continue
        payload = codec.compress_op(value, stochastic=stochastic, seed=0)
        decoded = codec.decompress_op(*payload, list(value.shape), value.dtype)
        own = sqnr_db(value, decoded)
        # Short of the floor already: the rebuilt values can only lower it.
        db = own if own < min_sqnr_db else min(own, _rebuilt_sqnr(closure, decoded, env, boundary))
        m.sqnr_db[c] = db
        if db < min_sqnr_db:
            m.codecs.remove(c)
            where = "" if db == own else " in the values rebuilt from it"
            m.excluded[c] = f"SQNR {db:.1f} dB{where} < min_sqnr_db {min_sqnr_db:g}"


def _seed(node: fx.Node) -> int:
    # Stable per tensor, so a recompiled graph rounds the same way.
    return zlib.crc32(node.name.encode()) & 0x7FFFFFFF


# Codecs inlined on the CPU. Their PyTorch definitions compile under Inductor to the same payloads and
# round trip as the ops (tests/test_compress.py holds them to it) and run
# faster than the ops (bench/bench_codecs.py, `path` column). `int8_group`
# quantises a partial last group along its own width: zero-padded to a whole
# group, Inductor 2.13's CPU code computed wrong codes in it. `int4_group` and
# `bool1` compile exactly too but their bit packing runs slower than the ops.
FUSIBLE_CODECS = frozenset({"int8_token", "int8_group", "int12_token", "bf16"})


def fusible_on(device: torch.device, *, stochastic: bool, codec: str, shape: Sequence[int]) -> bool:
    """Whether ``codec`` on ``device`` is inlined as traced PyTorch (see the module docstring)."""
    return device.type == "cpu" and not stochastic and codec in FUSIBLE_CODECS and len(shape) > 0


# Ops Inductor runs as library kernels (matrix multiplies, convolutions,
# attention): an inlined encode or decode next to them cannot join their loops.
_LIBRARY_KERNELS = _MATMULS | _BATCHED_MATMULS | {aten.convolution.default, aten.convolution_backward.default}


def _joins_kernels(node: fx.Node) -> bool:
    """Whether Inductor emits ``node`` as a loop other pointwise work can join."""
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and target.namespace == "aten"
        and target not in _LIBRARY_KERNELS
        and not _is_attention_op(target)
    )


def inlined_neighbours(info: JointGraphInfo, node: fx.Node) -> tuple[bool, bool]:
    """Whether an inlined codec's encode and decode of ``node`` join kernels the graph has anyway.

    The encode joins one when the op that makes the value's data, or a forward
    op that reads it, is a pointwise or reduction loop (the encode reads the
    value where that kernel does). The decode joins when every backward op
    that reads the value is such a loop; a matrix multiply among them needs
    the decoded value in memory, so the decode is a kernel of its own. The
    cost model charges a joining side what it adds to the kernel
    (:meth:`adacc_compiler.costs.CostModel.codec_cost`).
    """
    producer = _producer(node)
    forward_readers = [u for u in _consumers(producer) if info.is_fw(u)]
    encode = _joins_kernels(producer) or any(_joins_kernels(u) for u in forward_readers)
    backward_readers = [u for u in _consumers(node) if u in info.bw_pos]
    if not backward_readers:
        # A checkpoint: its readers are the rebuilt copies of its forward readers.
        backward_readers = [u for u in _consumers(node) if info.is_fw(u)]
    decode = bool(backward_readers) and all(_joins_kernels(u) for u in backward_readers)
    return encode, decode


def _traced(fn, *fake_args) -> fx.GraphModule:
    """``fn`` traced into ATen ops on the joint graph's fake values."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import _disable_current_modes

    mode = tp.fake_mode(fake_args)
    with mode:
        # Functional ATen only: the joint graph holds no mutations.
        # Decomposed as Inductor decomposes the joint graph.
        from torch._inductor.decomposition import select_decomp_table

        gm = make_fx(
            torch.func.functionalize(fn, remove="mutations"),
            tracing_mode="real",
            decomposition_table=select_decomp_table(),
        )(*fake_args)
    # Scalar constants (a Python number written into a tensor) become graph
    # ops, so the inlined code needs no attributes on the joint graph.
    for n in list(gm.graph.nodes):
        if n.op != "get_attr":
            continue
        value = getattr(gm, n.target)
        assert isinstance(value, torch.Tensor), f"adacc internal error: a traced codec holds {type(value)}"
        if value.numel() != 1:
            continue  # copied onto the joint graph by _inline
        with _disable_current_modes():
            scalar = value.item()
        with gm.graph.inserting_before(n):
            full = gm.graph.call_function(
                aten.full.default,
                (list(value.shape), scalar),
                {"dtype": value.dtype, "device": fake_args[0].device},
            )
        with mode:
            full.meta["val"] = torch.full(value.shape, scalar, dtype=value.dtype, device=fake_args[0].device)
        n.replace_all_uses_with(full)
        gm.graph.erase_node(n)
    return gm


def _inline(
    gm: fx.GraphModule, sub: fx.GraphModule, inputs: Sequence[fx.Node], added: list[fx.Node], attrs: list[str]
) -> list[fx.Node]:
    """Copy ``sub``'s nodes at ``gm``'s insertion point; return its outputs.

    Tensor constants become attributes of ``gm`` (their names go to ``attrs``).
    """
    graph = gm.graph
    env: dict[fx.Node, fx.Node] = {}
    placeholders = iter(inputs)
    outputs: list[fx.Node] = []
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(placeholders)
        elif n.op == "get_attr":
            name = f"_adacc_codec_constant_{len(attrs)}"
            while hasattr(gm, name):
                name += "_"
            value = getattr(sub, n.target)
            gm.register_buffer(name, value)
            attrs.append(name)
            env[n] = graph.get_attr(name)
            env[n].meta["val"] = tp.fake_mode([i.meta.get("val") for i in inputs]).from_tensor(
                value, static_shapes=True
            )
            added.append(env[n])
        elif n.op == "output":
            out = n.args[0]
            outputs = [env[out]] if isinstance(out, fx.Node) else [env[a] for a in out]
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
            added.append(env[n])
    return outputs


def _insert_traced(gm, codec, node, decode_at, added, attrs) -> tuple[list[fx.Node], fx.Node]:
    """The codec's PyTorch definition inlined: encode after ``node``, decode by ``decode_at``.

    (see :func:`_place_for_backward`)
    """
    val = node.meta["val"]
    shape = [int(s) for s in val.shape]
    enc = _traced(lambda x: tuple(codec.reference_compress(x)), val)
    with gm.graph.inserting_before(node.next):
        items = _inline(gm, enc, [node], added, attrs)
    for item in items:
        item.meta["adacc_payload"] = codec.name
    dec_gm = _traced(lambda *p: codec.reference_decompress(*p, shape, val.dtype), *[i.meta["val"] for i in items])
    start = len(added)
    with gm.graph.inserting_before(decode_at):
        (dec,) = _inline(gm, dec_gm, items, added, attrs)
    _place_for_backward(added[start:], decode_at)
    return items, dec


def _insert_ops(graph, codec, node, decode_at, added, *, stochastic: bool) -> tuple[list[fx.Node], fx.Node]:
    """Calls of the codec's ops: encode after ``node``, decode by ``decode_at`` (see :func:`_place_for_backward`)."""
    val = node.meta["val"]
    shape = [int(s) for s in val.shape]
    kwargs = {"stochastic": stochastic, "seed": _seed(node)}
    fake_payload = tp.fake_call(codec.compress_op, val, **kwargs)
    with graph.inserting_after(node):
        comp = graph.call_function(_overload(codec.name, "compress"), (node,), kwargs)
    comp.meta["val"] = tuple(fake_payload)
    comp.meta["adacc_compress"] = codec.name
    added.append(comp)
    items = []
    anchor = comp
    for i, fake in enumerate(fake_payload):
        with graph.inserting_after(anchor):
            item = graph.call_function(operator.getitem, (comp, i))
        item.meta["val"] = fake
        items.append(item)
        added.append(item)
        anchor = item
    with graph.inserting_before(decode_at):
        dec = graph.call_function(_overload(codec.name, "decompress"), (*items, shape, val.dtype))
    dec.meta["val"] = tp.fake_call(codec.decompress_op, *fake_payload, shape, val.dtype)
    added.append(dec)
    _place_for_backward([dec], decode_at)
    return items, dec


def _rebuilt_from_decoded(
    info: JointGraphInfo, compress: dict[fx.Node, str], recompute: set[fx.Node] | frozenset[fx.Node]
) -> list[fx.Node]:
    """The recomputed values that depend, through recomputed values, on a compressed one.

    The backward rebuilds them from the decoded copy (in forward order).
    """
    reached: set[fx.Node] = set()
    for node in sorted(recompute, key=info.order.__getitem__):
        if any(a in compress or a in reached for a in node.all_input_nodes):
            reached.add(node)
    return sorted(reached, key=info.order.__getitem__)


def _first_backward_node(info: JointGraphInfo) -> fx.Node:
    """The joint graph's first node that reads a tangent.

    Nodes placed before it that the backward needs are scheduled by the
    partition's reordering just before their first use (as recomputed ones are).
    """
    users = [u for p in info.gm.graph.find_nodes(op="placeholder") if tp._is_tangent(p) for u in p.users]
    users = [u for u in users if u.op != "output"]
    return min(users, key=info.order.__getitem__) if users else info.gm.graph.output_node()


def _place_for_backward(nodes: Sequence[fx.Node], first_backward: fx.Node) -> None:
    """Move ``nodes`` (new, in dependency order) just before ``first_backward``.

    A node whose input the forward computes later (the joint graph
    interleaves forward ops that only the backward reads) goes right after
    that input instead.
    """
    for node in nodes:
        # fx.Node compares by graph position (kept up to date as nodes move).
        latest = max(node.all_input_nodes, default=None)
        if latest is not None and latest > first_backward:
            latest.append(node)
        else:
            first_backward.prepend(node)


@contextlib.contextmanager
def codecs_inserted(
    info: JointGraphInfo,
    compress: dict[fx.Node, str],
    *,
    recompute: set[fx.Node] | frozenset[fx.Node] = frozenset(),
    stochastic: bool = False,
) -> Iterator[dict[fx.Node, list[fx.Node]]]:
    """Insert compress/decompress nodes for ``compress`` into ``info.gm``; undo on exit.

    Yields the payload nodes (what the forward saves) of each compressed value.
    Each compress node sits right after its value's producer. Each decompress
    sits ahead of the backward, so the partition's reordering runs it just
    before the first backward op that needs the value; every backward reader
    reads the decoded value. The values of ``recompute`` that depend on a
    compressed value get a copy of their op that reads the decoded values
    (tagged ``adacc_recompute_of`` in ``node.meta``), and their backward
    readers read the copy.
    """
    from adacc_compiler.triton_kernels import get_codec

    graph = info.gm.graph
    added: list[fx.Node] = []
    attrs: list[str] = []
    rewired: list[tuple[fx.Node, fx.Node, fx.Node]] = []  # (reader, original, replacement)
    payloads: dict[fx.Node, list[fx.Node]] = {}
    decode_at = _first_backward_node(info)
    try:
        rebuilt: dict[fx.Node, fx.Node] = {}
        for node in sorted(compress, key=info.order.__getitem__):
            codec = get_codec(compress[node])
            val = node.meta["val"]
            assert any(
                u in info.bw_pos or u in recompute for u in node.users
            ), f"adacc internal error: {node.name} is compressed but neither the backward nor a recomputed value reads it"
            shape = [int(s) for s in val.shape]
            if fusible_on(val.device, stochastic=stochastic, codec=codec.name, shape=shape):
                items, dec = _insert_traced(info.gm, codec, node, decode_at, added, attrs)
            else:
                items, dec = _insert_ops(graph, codec, node, decode_at, added, stochastic=stochastic)
            assert len(items) == codec.num_payloads, codec.name
            dec.meta["adacc_decompress"] = codec.name
            payloads[node] = items
            rebuilt[node] = dec
        for node in _rebuilt_from_decoded(info, compress, recompute):
            with graph.inserting_before(decode_at):
                copy = graph.node_copy(node, lambda a: rebuilt.get(a, a))  # (meta copied too)
            copy.meta["adacc_recompute_of"] = node.name
            added.append(copy)
            _place_for_backward([copy], decode_at)
            rebuilt[node] = copy
        for node, replacement in rebuilt.items():
            for r in [u for u in node.users if u in info.bw_pos]:
                r.replace_input_with(node, replacement)
                rewired.append((r, node, replacement))
        yield payloads
    finally:
        for reader, original, replacement in reversed(rewired):
            reader.replace_input_with(replacement, original)
        for n in reversed(added):
            graph.erase_node(n)
        for name in attrs:
            delattr(info.gm, name)


def _overload(codec: str, kind: str) -> torch._ops.OpOverload:
    """The registered op ``adacc::<codec>_<kind>`` that graph nodes call."""
    return getattr(torch.ops.adacc, f"{codec}_{kind}").default
