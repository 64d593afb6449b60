"""How long each forward node of a joint graph takes to compute once.

The planner charges a recomputed activation the time of the ops that rebuild
it in the backward, so it needs one number per forward node: the seconds that
node takes to run once, given its inputs. :class:`CostModel` provides it in one
of two ways.

*Measured* (``profile=True``). The node's op (an ATen overload) is run on real
tensors built from the fake tensors in ``node.meta["val"]`` of its arguments:
same shape, stride, dtype and device; floating tensors hold ``randn`` (from a
private generator: profiling leaves the global RNG alone), integer
tensors hold zeros (so indices are in bounds for ``embedding``, ``gather``,
``index`` and friends whatever the indexed size), bool tensors hold random
bits. It is warmed up once, then timed over enough back-to-back calls to pass
about a millisecond (at most 50 calls), in a few rounds whose fastest is kept.
On CUDA the device is synchronised around each round. Results are keyed by
device, torch version, overload and argument metadata; nodes with the same key
(the repeated layers of a transformer) are measured once, and keys are cached
in a JSON file under ``cache_dir`` so a second compile measures nothing. The
CPU "device" includes the intra-op thread count, which timings scale with.
Symbolic shapes are measured at their hints (the sizes seen when compiling).

*Roofline* (``profile=False``, and the fallback). ``flops / peak_flops +
bytes / bandwidth + launch_overhead`` with FLOPs from the formulas registered in
:mod:`torch.utils.flop_counter` (0 for ops without one, e.g. elementwise ops,
which are bandwidth-bound anyway) and bytes read from tensor inputs plus bytes
written to outputs. The device constants in :data:`DEVICE_SPECS` are rough
estimates, not calibrated numbers:

========  ===========================================  ============  ========
kind      peak FLOP/s                                  bandwidth     overhead
========  ===========================================  ============  ========
cpu       1e11 (any dtype; a few AVX cores)            2e10 B/s      5 us
cuda      H200-like: 9.9e14 bf16/fp16, 1.98e15 fp8,    4.8e12 B/s    4 us
          6.7e13 fp32/fp64
========  ===========================================  ============  ========

The roofline is used when measuring is off or impossible: random ops (see
:func:`draws_random`; the planner decides elsewhere that they cannot be
recomputed, but they still get a cost, and measuring them would advance the
user's RNG), targets that are not ATen overloads
(higher-order ops), shapes with no concrete hint, a device this process cannot
run on, and ops that raise when run. The last are counted in
:attr:`CostModel.stats` as ``measure_failed`` and named in a warning.

Views and other metadata-only ops (``view``, ``t``, ``expand``, ``slice``,
``getitem``, SymInt arithmetic, ...: anything whose schema returns a non-written
alias of an input) cost 0 in both modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import operator
import os
import platform
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_arg

from adacc_compiler.passes import _torch as tp
from adacc_compiler.passes.classify import draws_random

__all__ = [
    "CostModel",
    "DeviceSpec",
    "DEVICE_SPECS",
    "roofline_seconds",
    "node_flops",
    "node_bytes",
    "is_free",
    "draws_random",
]

log = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """Roofline constants of one device kind (estimates; see the module docstring)."""

    default_flops: float  # FLOP/s for dtypes not listed in ``flops_by_dtype``
    flops_by_dtype: Mapping[torch.dtype, float]
    bandwidth: float  # bytes/s of main memory
    overhead_s: float  # per-op dispatch/launch cost

    def peak_flops(self, dtype: torch.dtype | None) -> float:
        if dtype is None:
            return self.default_flops
        return self.flops_by_dtype.get(dtype, self.default_flops)


_FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)

DEVICE_SPECS: dict[str, DeviceSpec] = {
    "cpu": DeviceSpec(default_flops=1e11, flops_by_dtype={}, bandwidth=2e10, overhead_s=5e-6),
    "cuda": DeviceSpec(
        default_flops=6.7e13,
        flops_by_dtype={
            torch.bfloat16: 9.9e14,
            torch.float16: 9.9e14,
            **{d: 1.979e15 for d in _FP8_DTYPES},
        },
        bandwidth=4.8e12,
        overhead_s=4e-6,
    ),
}

# Shapes of unbacked SymInts have no hint; the roofline uses this instead, as
# Inductor does (``unbacked_symint_fallback``).
_UNBACKED_FALLBACK = 8192

# Timing policy: enough back-to-back calls per round to pass _ROUND_TARGET_S,
# capped at _MAX_REPS; _ROUNDS rounds, the fastest kept (other work on the
# machine only ever adds time: over three fresh measurements of the 4-layer
# Llama's ops, the fastest of five rounds moved by 3.8% at the median op and
# 19% at most, the median of three by 4.7% and 53%). A single round for ops
# so slow that one round already exceeds _SLOW_ROUND_S, to bound the
# profiling time.
_ROUND_TARGET_S = 1e-3
_MAX_REPS = 50
_ROUNDS = 5
_SLOW_ROUND_S = 20e-3

_CACHE_FILE = "op_costs.json"
# 2: measured without the Python dispatcher (see _eager), which format 1 timed.
# 3: the fastest of five rounds, not the median of three.
# 4: timed after Inductor's compile workers have started (see
#    _compile_workers_started); format 3 timed codecs 2-8x too slow.
# 5: prims ops timed through their ATen counterparts (see _timed_callable).
_CACHE_FORMAT = 5

# Ops whose schema says "alias of an input" but that copy when a view cannot
# express the result; each maps to a predicate (node) -> "this one is a view".
_MAYBE_COPY: dict[Any, Callable[[torch.fx.Node], bool]] = {}

# Factory ops that allocate without writing: their output bytes are not traffic.
_ALLOCATING_ONLY = {
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
}


# --------------------------------------------------------------------------- #
# Symbolic values and fake tensors
# --------------------------------------------------------------------------- #


class _NoHint(Exception):
    """A symbolic value has no concrete hint (unbacked)."""


def _concrete(x: Any, *, fallback: int | None = None) -> Any:
    """A concrete Python value for ``x`` (ints, floats, bools and their Sym* forms)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = tp.int_hint(x, fallback=fallback) if isinstance(x, torch.SymInt) else x.node.hint
        if hint is None:
            if fallback is None:
                raise _NoHint(repr(x))
            hint = fallback
        if isinstance(x, torch.SymInt):
            return int(hint)
        if isinstance(x, torch.SymFloat):
            return float(hint)
        return bool(hint)
    return x


def _tensor_geometry(
    t: torch.Tensor, *, fallback: int | None = None
) -> tuple[list[int], list[int], int]:
    size = [_concrete(s, fallback=fallback) for s in t.shape]
    stride = [_concrete(s, fallback=fallback) for s in t.stride()]
    offset = _concrete(t.storage_offset(), fallback=fallback)
    return size, stride, offset


def _span(size: list[int], stride: list[int]) -> int:
    """Number of storage elements a strided tensor reaches (< numel when broadcast)."""
    if any(s == 0 for s in size):
        return 0
    return 1 + sum((s - 1) * abs(st) for s, st in zip(size, stride))


def _tensors_in(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors_in(item)]
    return []


def _val(node: torch.fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _input_vals(node: torch.fx.Node) -> list[Any]:
    """Meta vals of the node's Node arguments, in argument order."""
    return [_val(n) for n in node.all_input_nodes]


def _first_tensor_input(node: torch.fx.Node) -> torch.Tensor | None:
    for v in _input_vals(node):
        ts = _tensors_in(v)
        if ts:
            return ts[0]
    return None


def _node_device(node: torch.fx.Node) -> torch.device:
    """Where the node runs: its output's device, else its first tensor input's."""
    for t in _tensors_in(_val(node)):
        return t.device
    for v in _input_vals(node):
        for t in _tensors_in(v):
            return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- #
# Free nodes
# --------------------------------------------------------------------------- #


def _input_contiguous(node: torch.fx.Node, memory_format: torch.memory_format = torch.contiguous_format) -> bool:
    t = _first_tensor_input(node)
    if t is None:
        return False
    try:
        return bool(t.is_contiguous(memory_format=memory_format))
    except Exception:  # data-dependent contiguity on unbacked shapes
        return False


def _same_dtype_device(node: torch.fx.Node) -> bool:
    t = _first_tensor_input(node)
    outs = _tensors_in(_val(node))
    if t is None or not outs or node.kwargs.get("copy", False):
        return False
    return outs[0].dtype == t.dtype and outs[0].device == t.device


def _contiguous_is_view(node: torch.fx.Node) -> bool:
    fmt = node.kwargs.get("memory_format", torch.contiguous_format)
    return _input_contiguous(node, fmt)


for _packet, _pred in (
    (aten.reshape, _input_contiguous),
    (aten.reshape_as, _input_contiguous),
    (aten.flatten, _input_contiguous),
    (aten.contiguous, _contiguous_is_view),
    (aten.to, _same_dtype_device),
    (aten.type_as, _same_dtype_device),
):
    _MAYBE_COPY[_packet] = _pred
for _name in ("_autocast_to_reduced_precision", "_autocast_to_full_precision"):
    if hasattr(aten, _name):
        _MAYBE_COPY[getattr(aten, _name)] = _same_dtype_device

# Not alias-annotated, yet metadata only.
_FREE_PACKETS = {aten._unsafe_view, aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset}


def _returns_alias(op: torch._ops.OpOverload) -> bool:
    """The schema returns a read-only alias of an input (views, detach, split, ...)."""
    returns = op._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


def is_free(node: torch.fx.Node) -> bool:
    """Whether computing ``node`` costs nothing: views, metadata and Python scalar ops."""
    if node.op != "call_function":
        return True  # placeholders, get_attr, output
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket
        if packet in _FREE_PACKETS:
            return True
        if packet in _MAYBE_COPY:
            return _MAYBE_COPY[packet](node)
        return _returns_alias(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return False
    # Python builtins (operator.getitem, operator.mul on SymInts), torch.sym_*,
    # math.*: bookkeeping around the ATen ops, no kernel behind them.
    if target is operator.getitem or getattr(target, "__module__", None) in ("_operator", "operator", "math"):
        return True
    if getattr(target, "__name__", "").startswith("sym_"):
        return True
    # Anything else is costed only if it produces tensors.
    return not _tensors_in(_val(node))


# --------------------------------------------------------------------------- #
# Roofline
# --------------------------------------------------------------------------- #


def _to_meta(x: Any) -> Any:
    """Fake tensors -> meta tensors of concrete shape; Sym* -> hints."""
    if isinstance(x, torch.Tensor):
        size, stride, _ = _tensor_geometry(x, fallback=_UNBACKED_FALLBACK)
        return torch.empty_strided(size, stride, dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(i) for i in x)
    return _concrete(x, fallback=_UNBACKED_FALLBACK)


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of one run of ``node`` per :mod:`torch.utils.flop_counter`; 0 without a formula."""
    if node.op != "call_function":
        return 0
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import _disable_current_modes

    target = node.target
    key = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
    try:
        formula = flop_counter.flop_registry.get(key)
    except TypeError:  # unhashable target
        return 0
    if formula is None:
        return 0
    try:
        # Meta tensors with concrete shapes keep symbolic shapes (and whatever
        # mode the caller is under) out of the formulas.
        with _disable_current_modes():
            args, kwargs = map_arg((node.args, node.kwargs), lambda n: _to_meta(_val(n)))
            out = _to_meta(_val(node))
            flops = formula(*args, out_val=out, **kwargs)
        return int(_concrete(flops, fallback=0))
    except Exception as e:  # a formula that does not fit this overload's arguments
        log.debug("no FLOP count for %s (%s): %s", node.name, target, e)
        return 0


def _tensor_bytes(t: torch.Tensor, *, reads: bool) -> int:
    size, stride, _ = _tensor_geometry(t, fallback=_UNBACKED_FALLBACK)
    numel = math.prod(size)
    # A broadcast input (stride 0) is read once per distinct element.
    n = min(numel, _span(size, stride)) if reads else numel
    return n * t.element_size()


def node_bytes(node: torch.fx.Node) -> int:
    """Bytes read from tensor inputs plus bytes written to tensor outputs."""
    if node.op != "call_function":
        return 0
    read = sum(
        _tensor_bytes(t, reads=True) for v in _input_vals(node) for t in _tensors_in(v)
    )
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.overloadpacket in _ALLOCATING_ONLY:
        return read
    written = sum(_tensor_bytes(t, reads=False) for t in _tensors_in(_val(node)))
    return read + written


def _compute_dtype(node: torch.fx.Node) -> torch.dtype | None:
    for v in _input_vals(node):
        for t in _tensors_in(v):
            if t.dtype.is_floating_point:
                return t.dtype
    for t in _tensors_in(_val(node)):
        return t.dtype
    return None


def roofline_seconds(node: torch.fx.Node, *, device_kind: str) -> float:
    """``flops / peak + bytes / bandwidth + overhead`` on ``device_kind`` ("cpu", "cuda"); 0 if free."""
    spec = DEVICE_SPECS.get(device_kind)
    if spec is None:
        raise ValueError(
            f"device_kind: no roofline constants for {device_kind!r}; known: {sorted(DEVICE_SPECS)}"
        )
    if is_free(node):
        return 0.0
    flops = node_flops(node)
    return flops / spec.peak_flops(_compute_dtype(node)) + node_bytes(node) / spec.bandwidth + spec.overhead_s


# Elements of the two kernels timed for CostModel.bool_read_seconds: large
# enough that the kernels, not the calls, dominate (256K: ~40-120 us on 2 CPU cores).
_BOOL_READ_ELEMENTS = 1 << 18

# Share of a fused op's measured time charged however little traffic the
# roofline leaves it: the bandwidth constants are rough.
_FUSED_FLOOR = 0.1


def fused_recompute_seconds(node: torch.fx.Node, measured_s: float, *, device_kind: str) -> float:
    """What recomputing ``node`` costs when Inductor computes it inside its readers' kernels.

    Timed alone, a pointwise op reads its inputs and writes its output in a
    kernel of its own; fused, its output is never written nor read back. Its
    traffic (:func:`node_bytes` at the device's bandwidth) comes off the
    measured time, down to ``_FUSED_FLOOR`` of it.
    """
    spec = DEVICE_SPECS.get(device_kind, DEVICE_SPECS["cuda"])
    return max(measured_s - node_bytes(node) / spec.bandwidth, _FUSED_FLOOR * measured_s)


def _elements(node: torch.fx.Node) -> int:
    """Elements of the node's (first) tensor output; 0 when it has none."""
    ts = _tensors_in(_val(node))
    return math.prod(_tensor_geometry(ts[0], fallback=_UNBACKED_FALLBACK)[0]) if ts else 0


def inlined_evaluations(node: torch.fx.Node, memo: dict[torch.fx.Node, int] | None = None) -> int:
    """How many elements of ``node`` Inductor computes when it inlines it into its readers' kernels.

    A kernel that reads an inlined value recomputes it at every one of its own
    elements. Readers that evaluate it at no more elements than its own are
    counted once together (they land in one fused kernel, where common
    subexpressions are computed once); each reader that broadcasts it adds all
    of its elements; a reader Inductor inlines in turn counts what *its*
    readers evaluate, and views pass through.

    That is what makes a small table expensive to recompute: the rotary
    embedding's ``cos`` and ``sin`` (128 x 64 values, shared by every layer)
    are read by each layer's rotations of queries and keys, forward and
    backward, so a recomputed copy is evaluated 1.8M times a step on a 4-layer
    Llama at batch 4 x 128, not 8K times. Inlined that way, they made one
    4 x 4 x 128 x 64 rotation take 50 instead of 21 us on a 2-core CPU.
    """
    from adacc_compiler.passes.liveness import fuses_into_users

    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    own = _elements(node)

    def reached(user: torch.fx.Node) -> int:
        if is_free(user) or fuses_into_users(user):
            return inlined_evaluations(user, memo)
        return _elements(user)

    reach = [reached(u) for u in node.users]
    broadcast = [r for r in reach if r > own]
    total = sum(broadcast) + (own if len(broadcast) < len(reach) else 0)
    memo[node] = max(total, own)
    return memo[node]


def bool_inputs_and_inlined_elements(node: torch.fx.Node) -> tuple[int, int]:
    """Bool tensors ``node`` reads, and the elements of the kernels that inline it.

    A recomputed value Inductor inlines is evaluated once per element of each
    reader's kernel, so a mask broadcast into attention scores is read over
    every head: the second figure sums the readers' output elements.
    """
    bools = 0
    for v in _input_vals(node):
        bools += sum(1 for t in _tensors_in(v) if t.dtype == torch.bool)
    elements = 0
    for user in node.users:
        for t in _tensors_in(_val(user)):
            elements += math.prod(_tensor_geometry(t, fallback=_UNBACKED_FALLBACK)[0])
    return bools, elements


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #


class _Unmeasurable(Exception):
    """This node cannot be measured (missing metadata, no hint, ...)."""


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        name = ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = name or platform.processor() or platform.machine()
        # Timings scale with the intra-op thread count, so it is part of the device.
        return f"{name} x{torch.get_num_threads()}"
    return str(device)


def _device_usable(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    mod = getattr(torch, device.type, None)
    return bool(mod is not None and getattr(mod, "is_available", lambda: False)())


def _describe(x: Any) -> str:
    """The part of the cache key for one argument."""
    if isinstance(x, torch.fx.Node):
        v = _val(x)
        if v is None:
            raise _Unmeasurable(f"argument {x.name} has no meta['val']")
        return _describe_value(v)
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_describe(i) for i in x) + "]"
    if isinstance(x, dict):
        return "{" + ",".join(f"{k}={_describe(v)}" for k, v in sorted(x.items())) + "}"
    return _describe_value(x)


def _describe_value(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        try:
            size, stride, _ = _tensor_geometry(v)
        except _NoHint as e:
            raise _Unmeasurable(f"tensor shape without a hint: {e}") from None
        return f"T({str(v.dtype).removeprefix('torch.')},{size},{stride})"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_describe_value(i) for i in v) + "]"
    try:
        return repr(_concrete(v))
    except _NoHint as e:
        raise _Unmeasurable(f"scalar without a hint: {e}") from None


_Generators = dict[torch.device, torch.Generator]


def _generator(gens: _Generators, device: torch.device) -> torch.Generator:
    if device not in gens:
        gens[device] = torch.Generator(device=device)
        gens[device].manual_seed(0)
    return gens[device]


def _materialize(
    v: Any, device: torch.device | None, node_device: torch.device, gens: _Generators
) -> Any:
    """A real value standing for the meta value ``v``; tensors move to ``device`` if given."""
    if isinstance(v, torch.Tensor):
        if v.layout != torch.strided:
            raise _Unmeasurable(f"layout {v.layout}")
        size, stride, offset = _tensor_geometry(v)
        dev = v.device
        # CPU scalars stay on the CPU (they are legal next to CUDA tensors).
        if device is not None and (v.device == node_device or v.dim() > 0):
            dev = device
        n = offset + _span(size, stride)
        dtype = v.dtype
        # Build a flat storage and view it, so stride-0 and overlapping layouts work.
        if dtype.is_floating_point or dtype.is_complex:
            if dtype.itemsize == 1:  # float8: no randn kernel
                base = torch.randn(n, device=dev, generator=_generator(gens, dev)).to(dtype)
            else:
                base = torch.randn(n, device=dev, dtype=dtype, generator=_generator(gens, dev))
        elif dtype == torch.bool:
            base = torch.randint(0, 2, (n,), device=dev, dtype=torch.bool, generator=_generator(gens, dev))
        else:
            # Zeros: a valid index into any non-empty dimension.
            base = torch.zeros(n, device=dev, dtype=dtype)
        return base.as_strided(size, stride, offset)
    if isinstance(v, (list, tuple)):
        return type(v)(_materialize(i, device, node_device, gens) for i in v)
    return _concrete(v)


def _build_args(
    node: torch.fx.Node, device: torch.device | None, node_device: torch.device, gens: _Generators
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    made: dict[torch.fx.Node, Any] = {}

    def real(n: torch.fx.Node) -> Any:
        # The same node passed twice (mul(x, x)) gets the same tensor, as at run time.
        if n not in made:
            v = _val(n)
            if v is None:
                raise _Unmeasurable(f"argument {n.name} has no meta['val']")
            made[n] = _materialize(v, device, node_device, gens)
        return made[n]

    def fix_device(x: Any) -> Any:
        # Factory ops name their device; measure them where we measure.
        if device is not None and isinstance(x, torch.device) and x == node_device:
            return device
        if isinstance(x, list):
            return [fix_device(i) for i in x]
        if isinstance(x, tuple):
            return tuple(fix_device(i) for i in x)
        return _concrete(x)

    args, kwargs = map_arg((node.args, node.kwargs), real)
    args = tuple(fix_device(a) if not isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: fix_device(v) if not isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return args, kwargs


def _reference_codec(codec: Any, shape: Sequence[int], dtype: torch.dtype) -> tuple[Callable, Callable]:
    """The codec's PyTorch definition as an (encode, decode) pair, for Inductor to compile."""

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(codec.reference_compress(x))

    def decode(*payloads: torch.Tensor) -> torch.Tensor:
        return codec.reference_decompress(*payloads, list(shape), dtype)

    return encode, decode


def _codec_source_tag(codec: Any) -> str:
    """A checksum of the code that defines ``codec``: a timing cached for an
    older definition of the codec is not served for a newer one."""
    return _module_source_tag(codec.reference_compress.__module__)


@functools.cache
def _module_source_tag(module_name: str) -> str:
    # Once per process: every codec cost looks it up, cached or not.
    import inspect
    import sys

    from adacc_compiler.triton_kernels import _common

    text = inspect.getsource(sys.modules[module_name]) + inspect.getsource(_common)
    return f"src {zlib.crc32(text.encode()):08x}"


def _neighbour(v: torch.Tensor) -> torch.Tensor:
    """A pointwise op standing for the kernel an inlined codec joins (see ``CostModel.codec_cost``)."""
    return v * 1.5 + 0.5


def _inductor_compiled(fn: Callable[..., Any], *example: torch.Tensor) -> Callable[..., Any]:
    """``fn`` traced on ``example`` and compiled by Inductor's graph compiler itself.

    The call runs the generated code and nothing else, as a kernel inside a
    compiled graph does. ``torch._inductor.compile`` would wrap it in Dynamo's
    disable wrapper and AOTAutograd's runtime wrapper: about 5 us more a call
    on a 2-core CPU, and, called from inside a compile (where adacc measures),
    that wrapper cost 40-200 us a call, so codecs measured 2-6x dearer than
    they run.
    """
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    returns_tuple = False

    def flat(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal returns_tuple
        out = fn(*args)
        returns_tuple = isinstance(out, (tuple, list))
        return tuple(out) if returns_tuple else (out,)

    # Decomposed as AOTAutograd decomposes a graph before handing it to Inductor.
    gm = make_fx(flat, decomposition_table=select_decomp_table())(*example)
    # Not under the tracing context of a compile adacc runs inside: Inductor
    # would take that graph's fake mode for this one's inputs.
    with torch._guards.tracing(None):
        compiled = compile_fx_inner(gm, list(example))

    def call(*args: torch.Tensor) -> Any:
        out = compiled(list(args))
        return tuple(out) if returns_tuple else out[0]

    return call


def _iota_as_arange(length, *, start, step, dtype, device, requires_grad):
    return torch.ops.aten.arange.start_step(start, start + length * step, step, dtype=dtype, device=device)


def _convert_as_to_copy(a, dtype):
    return torch.ops.aten._to_copy.default(a, dtype=dtype)


# prims ops run in eager mode through Python reference implementations: a
# float32 -> bfloat16 convert_element_type of 128K elements takes 47 us
# against 12 us for aten._to_copy, a 128-element iota 16 us against 5 us for
# aten.arange (2-core CPU). Inductor lowers them to the same loops as their
# ATen counterparts, so those are what gets timed.
_ATEN_COUNTERPARTS: dict[Any, Callable[..., Any]] = {
    torch.ops.prims.convert_element_type.default: _convert_as_to_copy,
    torch.ops.prims.iota.default: _iota_as_arange,
}


def _timed_callable(target: torch._ops.OpOverload) -> Callable[..., Any]:
    """What runs when ``target`` is timed: the op itself, or its ATen counterpart for a prims op."""
    return _ATEN_COUNTERPARTS.get(target, target)


@contextlib.contextmanager
def _eager():
    """Plain eager execution for timing, whatever the partitioner runs under.

    The partitioner runs inside AOTAutograd, under fake/proxy modes and with
    the Python dispatcher on. The dispatcher alone adds about 5 us to every
    op on a 2-core CPU (a 32 KiB clone: 6.7 against 1.8 us), which compiled
    code does not pay; timed under it, small ops looked up to several times
    dearer than they run (a 32 KiB strided clone in a compile of a 4-layer
    Llama: 13.2 us under it, 5.5 us outside it).
    """
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad(), torch._C._DisablePythonDispatcher():
        yield


def _compile_workers_started() -> None:
    """Let Inductor's compile-worker processes finish starting before anything is timed.

    Dynamo starts them (one Python process per compile thread, each importing
    torch) when a compile begins, which is when adacc measures its costs. On a
    2-core CPU they hold the cores for a few seconds: a 150 us codec kernel
    timed in that window measured 15-25 ms a call, and the plan avoided it.
    Once per process; a no-op where Inductor compiles in-process.
    """
    global _workers_waited
    if _workers_waited:
        return
    _workers_waited = True
    try:
        from torch._inductor.async_compile import AsyncCompile

        t0 = time.perf_counter()
        AsyncCompile.warm_pool()
        AsyncCompile.wait_pool_ready()
        log.debug("Inductor's compile workers ready after %.2f s", time.perf_counter() - t0)
    except Exception as e:  # internal API: timings are still taken, only noisier
        log.debug("could not wait for Inductor's compile workers (%s: %s)", type(e).__name__, e)


_workers_waited = False


def _time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds per call of ``fn``: the fastest of a few rounds of back-to-back calls."""
    if device.type == "cuda":
        sync: Callable[[], None] = lambda: torch.cuda.synchronize(device)
    else:
        sync = lambda: None

    fn()  # warm-up: lazy init, allocator, kernel selection
    sync()
    # The fastest of three single calls sizes the rounds: one call can be
    # slowed by a transient (another process taking a core for a time slice),
    # and a slow-looking op is timed in a single round.
    once = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        sync()
        once = min(once, time.perf_counter() - t0)
    reps = max(1, min(_MAX_REPS, math.ceil(_ROUND_TARGET_S / max(once, 1e-9))))
    rounds = 1 if once * reps > _SLOW_ROUND_S else _ROUNDS

    samples: list[float] = []
    for _ in range(rounds):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) / reps)
    return min(*samples, once)


# --------------------------------------------------------------------------- #
# CostModel
# --------------------------------------------------------------------------- #


class CostModel:
    """Seconds to compute each forward node once, measured (cached) or estimated.

    Args:
        profile: Measure ops with real tensors (``True``) or use the roofline only.
        cache_dir: Directory of the on-disk cache of measurements; ``None``
            keeps measurements in memory only.
        device: Where to measure. ``None`` measures each node on the device of
            its fake output. Also picks the roofline constants.
    """

    def __init__(
        self,
        *,
        profile: bool,
        cache_dir: str | os.PathLike[str] | None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(profile, bool):
            raise ValueError(f"profile: expected a bool, got {profile!r}")
        self.profile = profile

        self.device: torch.device | None = None
        if device is not None:
            try:
                self.device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device: cannot parse {device!r} as a torch.device: {e}") from None
            if self.device.type not in DEVICE_SPECS:
                raise ValueError(
                    f"device: no cost constants for device kind {self.device.type!r}; "
                    f"known: {sorted(DEVICE_SPECS)}"
                )
            if profile and not _device_usable(self.device):
                raise ValueError(f"device: cannot measure on {self.device}: it is not available here")

        self._cache_path: str | None = None
        if cache_dir is not None:
            if not isinstance(cache_dir, (str, os.PathLike)):
                raise ValueError(f"cache_dir: expected a path or None, got {cache_dir!r}")
            cache_dir = os.fspath(cache_dir)
            if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
                raise ValueError(f"cache_dir: {cache_dir!r} exists and is not a directory")
            try:
                os.makedirs(cache_dir, exist_ok=True)
                self._cache_path = os.path.join(cache_dir, _CACHE_FILE)
            except OSError as e:
                # A cache we cannot create only costs time; do not fail the compile.
                log.warning("cost cache disabled: cannot create %s: %s", cache_dir, e)

        self._table: dict[str, float] = self._load() if profile else {}
        self._failed: set[str] = set()  # keys whose op raised; not retried in this process
        self._warned_ops: set[str] = set()
        self._warned_devices: set[str] = set()
        self._device_names: dict[torch.device, str] = {}
        self._generators: _Generators = {}
        self._stats: dict[str, float] = {
            "nodes": 0,  # nodes costed
            "free": 0,  # views, metadata, Python scalar ops: cost 0
            "measured": 0,  # distinct measurements run
            "cache_hits": 0,  # nodes costed from an earlier measurement (disk or this process)
            "roofline": 0,  # nodes costed by the roofline, including failures
            "measure_failed": 0,  # of those: nodes whose measurement raised
            "measure_seconds": 0.0,  # wall time spent measuring
        }

    # ------------------------------------------------------------------ cache

    def _load(self) -> dict[str, float]:
        if self._cache_path is None or not os.path.exists(self._cache_path):
            return {}
        try:
            with open(self._cache_path) as f:
                raw = json.load(f)
            if raw.get("format") != _CACHE_FORMAT:
                log.info("ignoring cost cache %s: format %r", self._cache_path, raw.get("format"))
                return {}
            entries = {str(k): float(v) for k, v in raw["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable cost cache %s: %s", self._cache_path, e)
            return {}
        log.debug("loaded %d op costs from %s", len(entries), self._cache_path)
        return entries

    def _save(self) -> None:
        if self._cache_path is None:
            return
        # Merge with what other processes may have written since we loaded.
        entries = {**self._load(), **self._table}
        directory = os.path.dirname(self._cache_path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".op_costs.", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": _CACHE_FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
                os.replace(tmp, self._cache_path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            log.warning("could not write cost cache %s: %s", self._cache_path, e)

    # ------------------------------------------------------------------ keys

    def _device_name(self, device: torch.device) -> str:
        if device not in self._device_names:
            self._device_names[device] = _device_name(device)
        return self._device_names[device]

    def _key(self, node: torch.fx.Node, device: torch.device) -> str:
        assert isinstance(node.target, torch._ops.OpOverload)
        args = ",".join(_describe(a) for a in node.args)
        kwargs = ",".join(f"{k}={_describe(v)}" for k, v in sorted(node.kwargs.items()))
        return (
            f"{device.type}|{self._device_name(device)}|torch {torch.__version__}|"
            f"{node.target}|({args})|{{{kwargs}}}"
        )

    # ------------------------------------------------------------------ costs

    def _measure_device(self, node: torch.fx.Node) -> torch.device:
        return self.device if self.device is not None else _node_device(node)

    def _roofline(self, node: torch.fx.Node) -> float:
        kind = self._measure_device(node).type
        if kind not in DEVICE_SPECS:
            if kind not in self._warned_devices:
                self._warned_devices.add(kind)
                log.warning("no roofline constants for device kind %r; using those of cuda", kind)
            kind = "cuda"
        self._stats["roofline"] += 1
        return roofline_seconds(node, device_kind=kind)

    def _measurable(self, node: torch.fx.Node) -> bool:
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            return False  # higher-order ops and Python callables
        if draws_random(node):
            return False  # not recomputable anyway, and running it would advance the RNG
        device = self._measure_device(node)
        if not _device_usable(device):
            if str(device) not in self._warned_devices:
                self._warned_devices.add(str(device))
                log.warning("cannot measure ops on %s here; using the roofline estimate for them", device)
            return False
        return True

    def _measure(self, node: torch.fx.Node, device: torch.device) -> float:
        node_device = _node_device(node)
        target = node.target
        assert isinstance(target, torch._ops.OpOverload)
        # Real tensors, whatever fake/proxy mode the caller (a partitioner) is under.
        _compile_workers_started()
        with _eager():
            ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            with ctx:
                args, kwargs = _build_args(node, self.device, node_device, self._generators)
                fn = _timed_callable(target)
                return _time_call(lambda: fn(*args, **kwargs), device)

    def _measure_pending(
        self,
        pending: dict[str, list[torch.fx.Node]],
        costs: dict[torch.fx.Node, float],
        failed_now: list[torch.fx.Node],
    ) -> None:
        cuda = sorted(
            {
                d.index if d.index is not None else torch.cuda.current_device()
                for d in (self._measure_device(g[0]) for g in pending.values())
                if d.type == "cuda"
            }
        )
        # Only deterministic ops are run and inputs come from private
        # generators; forking is insurance that the user's RNG stream is intact.
        with torch.random.fork_rng(devices=cuda):
            for key, group in pending.items():
                node = group[0]
                t0 = time.perf_counter()
                try:
                    seconds = self._measure(node, self._measure_device(node))
                except Exception as e:  # the op itself, or building its inputs
                    log.debug("measuring %s (%s) failed: %s: %s", node.name, node.target, type(e).__name__, e)
                    self._failed.add(key)
                    failed_now.extend(group)
                    continue
                finally:
                    self._stats["measure_seconds"] += time.perf_counter() - t0
                self._stats["measured"] += 1
                self._table[key] = seconds
                # The rest of the group reuses the measurement.
                self._stats["cache_hits"] += len(group) - 1
                for other in group:
                    costs[other] = seconds

    def recompute_costs(self, nodes: Iterable[torch.fx.Node]) -> dict[torch.fx.Node, float]:
        """Seconds each node adds to the backward when recomputed there.

        :meth:`node_costs`, except for values Inductor computes inside the
        kernels that read them (:func:`fuses_into_users`): those cost their
        time less their own memory traffic (:func:`fused_recompute_seconds`).
        """
        from adacc_compiler.passes.liveness import fuses_into_users

        nodes = list(nodes)
        costs = self.node_costs(nodes)
        fused = [c for c in nodes if fuses_into_users(c)]
        evaluated: dict[torch.fx.Node, int] = {}
        for c in fused:
            costs[c] = fused_recompute_seconds(c, costs[c], device_kind=self.device_kind(c))
            own = _elements(c)
            if own > 0:
                # Broadcast into larger readers, it is computed once per element of theirs.
                costs[c] *= max(1.0, inlined_evaluations(c, evaluated) / own)
            bools, elements = bool_inputs_and_inlined_elements(c)
            if bools:
                # Its readers' kernels load the bool input(s) element by element.
                costs[c] += bools * elements * self.bool_read_seconds(self._measure_device(c))
        log.debug("adacc: %d of %d recomputable values fuse into their readers", len(fused), len(nodes))
        return costs

    def bool_read_seconds(self, device: torch.device) -> float:
        """Extra seconds per element when an Inductor kernel reads a bool tensor instead of a float one.

        Inductor's vectorised CPU kernels load a bool operand through a
        per-element mask conversion: on a 2-core x86 CPU, ``x * c + where(m, 0,
        -inf)`` over 256K float32 elements ran 122 us with a saved bool ``m``
        against 43 us with the float mask saved instead, and a softmax over
        attention scores reading the mask 387 against 119 us. A recomputed value
        that reads a bool and is inlined (the float attention mask built from a
        saved bool) pays that in every kernel it lands in. Measured once per
        device (cached) with two pointwise kernels compiled by Inductor; 0 when
        profiling is off or the device cannot be measured.
        """
        device = self.device if self.device is not None else torch.device(device)
        if not self.profile or not _device_usable(device):
            return 0.0
        key = f"{device.type}|{self._device_name(device)}|torch {torch.__version__}|bool read per element"

        def measure() -> float:
            n = _BOOL_READ_ELEMENTS
            gen = _generator(self._generators, device)
            x = torch.randn(n, generator=gen, device=device)
            mask = torch.rand(n, generator=gen, device=device) > 0.5
            floats = torch.where(mask, 0.0, -1.0)
            read_bool = _inductor_compiled(lambda a, m: a * 0.5 + torch.where(m, 0.0, -1.0), x, mask)
            read_float = _inductor_compiled(lambda a, f: a * 0.5 + f, x, floats)
            extra = _time_call(lambda: read_bool(x, mask), device) - _time_call(lambda: read_float(x, floats), device)
            seconds = max(0.0, extra) / n
            log.debug("adacc: a bool operand costs %.3g ns per element on %s", seconds * 1e9, device)
            return seconds

        return self._cached_measurement(key, measure)

    def node_costs(self, nodes: Iterable[torch.fx.Node]) -> dict[torch.fx.Node, float]:
        """Seconds to compute each node once. Nodes with the same key are measured once."""
        nodes = list(nodes)
        costs: dict[torch.fx.Node, float] = {}
        pending: dict[str, list[torch.fx.Node]] = {}
        failed_now: list[torch.fx.Node] = []
        measured_before = self._stats["measured"]

        for node in nodes:
            self._stats["nodes"] += 1
            if is_free(node):
                self._stats["free"] += 1
                costs[node] = 0.0
                continue
            if not self.profile or not self._measurable(node):
                costs[node] = self._roofline(node)
                continue
            try:
                key = self._key(node, self._measure_device(node))
            except _Unmeasurable as e:
                log.debug("cannot measure %s (%s): %s", node.name, node.target, e)
                failed_now.append(node)
                continue
            if key in self._table:
                self._stats["cache_hits"] += 1
                costs[node] = self._table[key]
            elif key in self._failed:
                failed_now.append(node)
            else:
                pending.setdefault(key, []).append(node)

        if pending:
            self._measure_pending(pending, costs, failed_now)

        for node in failed_now:
            self._stats["measure_failed"] += 1
            costs[node] = self._roofline(node)
        new_failed_ops = sorted({str(n.target) for n in failed_now} - self._warned_ops)
        if new_failed_ops:
            self._warned_ops.update(new_failed_ops)
            log.warning(
                "could not measure %d node(s) (ops: %s); using the roofline estimate for them",
                len(failed_now),
                ", ".join(new_failed_ops),
            )

        if self._stats["measured"] > measured_before:
            self._save()
        log.info(
            "op costs: %d nodes, %d free, %d measured, %d cache hits, %d roofline (%d failed to measure), "
            "%.2f s measuring",
            *(self._stats[k] for k in ("nodes", "free", "measured", "cache_hits", "roofline", "measure_failed")),
            self._stats["measure_seconds"],
        )
        assert len(costs) == len(set(nodes)), "every node must get a cost"
        return {n: costs[n] for n in nodes}

    def codec_cost(
        self,
        codec_name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        *,
        fused: bool = False,
        encode_joins: bool = False,
        decode_joins: bool = False,
    ) -> float:
        """Seconds to encode and then decode one ``shape`` x ``dtype`` tensor with a codec.

        Measured on random data on ``device`` (cached like op costs) when
        profiling, else the roofline. ``fused``: the rewrite inlines the
        codec's PyTorch definition for Inductor (see
        :func:`adacc_compiler.passes.compress.fusible_on`), so its encode and
        decode are compiled by Inductor and timed as such kernels; else the
        codec's ops are timed.

        Inlined, an encode next to a pointwise producer or reader of the value
        (``encode_joins``), or a decode whose readers are all pointwise
        (``decode_joins``), becomes part of a kernel Inductor emits anyway (see
        :func:`adacc_compiler.passes.compress.inlined_neighbours`). That side
        costs what it adds to such a kernel: the time of a pointwise kernel
        with the encode fused in (reading the decoded value) less the time of
        the same kernel alone, and never less than moving the payload once at
        the device's bandwidth. A standalone side is timed on its own.

        Kernels are traced and handed to Inductor directly, not through
        ``torch.compile``: inlined, they run inside the graph's own compiled
        code, and a Dynamo-wrapped function would add its guard checks to
        every call. Those grow with every shape compiled through the same
        function: on a 2-core CPU, in a process compiling a 4-layer Llama,
        they made the int8_token pair of a 4x128x256 float32 tensor measure
        320-550 us against 160-270 us compiled directly.
        """
        if not fused and (encode_joins or decode_joins):
            raise ValueError("codec_cost: encode_joins and decode_joins need fused=True (an inlined codec)")
        from adacc_compiler.triton_kernels import get_codec

        codec = get_codec(codec_name)
        device = self.device if self.device is not None else torch.device(device)
        numel = math.prod(shape)
        payload = codec.compressed_nbytes(tuple(shape), dtype)
        kind = device.type if device.type in DEVICE_SPECS else "cuda"
        spec = DEVICE_SPECS[kind]
        floor = payload / spec.bandwidth
        standalone = (numel * dtype.itemsize + payload) / spec.bandwidth + spec.overhead_s
        if not self.profile or not _device_usable(device):
            self._stats["roofline"] += 1
            return (floor if encode_joins else standalone) + (floor if decode_joins else standalone)
        return self._codec_side(codec, "encode", shape, dtype, device, fused=fused, joins=encode_joins, floor=floor) + (
            self._codec_side(codec, "decode", shape, dtype, device, fused=fused, joins=decode_joins, floor=floor)
        )

    def _codec_side(
        self,
        codec: Any,
        side: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        *,
        fused: bool,
        joins: bool,
        floor: float,
    ) -> float:
        """Measured seconds of a codec's encode or decode (see :meth:`codec_cost`)."""
        path = ("joined " if joins else "") + ("fused kernels" if fused else "ops")
        key = (
            f"{device.type}|{self._device_name(device)}|torch {torch.__version__}|codec {codec.name} {side} {path}|"
            f"{_codec_source_tag(codec)}|{tuple(shape)}|{dtype}"
        )

        def measure() -> float:
            gen = _generator(self._generators, device)
            if dtype == torch.bool:
                x = torch.rand(shape, generator=gen, device=device) > 0.5
            else:
                x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
            if not fused:
                if side == "encode":
                    return _time_call(lambda: codec.compress_op(x), device)
                payload = codec.compress_op(x)
                return _time_call(lambda: codec.decompress_op(*payload, list(shape), dtype), device)
            encode, decode = _reference_codec(codec, shape, dtype)
            if side == "encode":
                fn, args = encode, (x,)
                with_neighbour = lambda v: (_neighbour(v), *encode(v))  # noqa: E731
            else:
                fn, args = decode, tuple(_inductor_compiled(encode, x)(x))
                with_neighbour = lambda *p: _neighbour(decode(*p))  # noqa: E731
            if not joins:
                kernel = _inductor_compiled(fn, *args)
                return _time_call(lambda: kernel(*args), device)
            # The pointwise neighbour: any cheap elementwise op of the value.
            alone = _inductor_compiled(_neighbour, x)
            joined = _inductor_compiled(with_neighbour, *args)
            extra = _time_call(lambda: joined(*args), device) - _time_call(lambda: alone(x), device)
            return max(extra, floor)

        return self._cached_measurement(key, measure)

    def _cached_measurement(self, key: str, measure: Callable[[], float]) -> float:
        """``measure()`` (run in plain eager mode once Inductor's workers are up), cached under ``key``."""
        if key in self._table:
            self._stats["cache_hits"] += 1
            return self._table[key]
        _compile_workers_started()
        t0 = time.perf_counter()
        with _eager():
            seconds = measure()
        self._stats["measure_seconds"] += time.perf_counter() - t0
        self._stats["measured"] += 1
        self._table[key] = seconds
        self._save()
        return seconds

    def device_kind(self, node: torch.fx.Node) -> str:
        """The kind of device ``node`` is measured on ("cpu", "cuda", ...)."""
        return self._measure_device(node).type

    def node_cost(self, node: torch.fx.Node) -> float:
        """Seconds to compute ``node`` once."""
        return self.node_costs([node])[node]

    @property
    def stats(self) -> dict[str, float]:
        """Counters since construction (a copy); see ``__init__`` for their meaning."""
        out = dict(self._stats)
        out["cached_entries"] = len(self._table)
        return out

