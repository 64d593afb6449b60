"""The private PyTorch partitioner helpers adacc relies on, imported in one place.

adacc reuses the pieces of ``torch._functorch.partitioners`` that every
partitioner needs (node classification, fw/bw extraction, the reordering of
recomputed nodes) and replaces only the choice of saved values. These are
private APIs; keeping every import here makes a PyTorch upgrade a one-file
change. Supported: torch 2.11 to 2.13.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch._functorch import config as functorch_config
from torch._functorch import partitioners as _p
from torch._functorch._aot_autograd.utils import _is_primal, _is_tangent  # noqa: F401
from torch._functorch.compile_utils import fx_graph_cse, raise_getitems
from torch._functorch.partitioners import (  # noqa: F401
    NodeInfo,
    _must_be_in_backward,
    _must_be_in_forward,
    classify_nodes,
    cleanup_recompute_tags,
    default_partition,
    force_save_bw_mutation_src,
    force_save_collectives,
    force_save_effectful_ops,
    has_recomputable_ops,
    min_cut_rematerialization_partition,
    reordering_to_mimic_autograd_engine,
)
from torch.fx.experimental.proxy_tensor import is_sym_node  # noqa: F401

__all__ = [
    "prepare_joint_graph",
    "extract_fwd_bwd",
    "finish_backward",
    "classify_nodes",
    "default_partition",
    "min_cut_rematerialization_partition",
    "is_sym_node",
    "_is_primal",
    "_is_tangent",
    "_must_be_in_forward",
    "_must_be_in_backward",
]

_EXTRACT_PARAMS = inspect.signature(_p._extract_fwd_bwd_modules).parameters


def prepare_joint_graph(joint_module: fx.GraphModule) -> fx.GraphModule:
    """The clean-up every partitioner applies before deciding (as the min-cut does)."""
    joint_module.graph.eliminate_dead_code()
    joint_module.recompile()
    if functorch_config.cse:
        joint_module.graph = fx_graph_cse(joint_module.graph)
    if has_recomputable_ops(joint_module):
        joint_module = cleanup_recompute_tags(joint_module, is_default_partition=False)
    if not getattr(functorch_config, "unsafe_allow_optimization_of_collectives", False):
        force_save_collectives(joint_module)
    force_save_effectful_ops(joint_module)
    force_save_bw_mutation_src(joint_module)
    return joint_module


def extract_fwd_bwd(
    joint_module: fx.GraphModule,
    saved_values: list[fx.Node],
    saved_sym_nodes: list[fx.Node],
    *,
    num_fwd_outputs: int,
    static_lifetime_input_nodes: Any,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split the joint graph so that the forward saves exactly ``saved_values``."""
    kwargs: dict[str, Any] = {
        "num_fwd_outputs": num_fwd_outputs,
        "static_lifetime_input_nodes": static_lifetime_input_nodes,
    }
    if "saved_opaque_nodes" in _EXTRACT_PARAMS:
        kwargs["saved_opaque_nodes"] = []
    return _p._extract_fwd_bwd_modules(joint_module, saved_values, saved_sym_nodes, **kwargs)


def finish_backward(
    fw_module: fx.GraphModule, bw_module: fx.GraphModule
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Place each recomputed value just before its first backward use, as the min-cut does."""
    bw_module = reordering_to_mimic_autograd_engine(bw_module)
    fw_module = raise_getitems(fw_module)
    bw_module = raise_getitems(bw_module)
    thread = getattr(_p, "thread_graphsafe_rng_from_hops", None)
    if thread is not None:
        fw_module = thread(fw_module, is_backward=False)
        bw_module = thread(bw_module, is_backward=True)
    return fw_module, bw_module


def fake_mode(values):
    """The fake mode of the joint graph's values."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    assert mode is not None, "adacc internal error: joint graph values carry no fake mode"
    return mode


def fake_call(op, *args, **kwargs):
    """``op`` run on the joint graph's fake values (the ``val`` of a new node)."""
    with fake_mode(args):
        return op(*args, **kwargs)


def int_hint(x: Any, *, fallback: int | None) -> int | None:
    """A concrete value for a (possibly symbolic) int: its hint, else ``fallback``.

    None for an unbacked int when ``fallback`` is None.
    """
    if not isinstance(x, torch.SymInt):
        return int(x)
    hint = x.node.hint
    if hint is None:
        try:
            # torch 2.13; older releases name it size_hint
            from torch.fx.experimental.symbolic_shapes import optimization_hint as hint_of
        except ImportError:
            from torch.fx.experimental.symbolic_shapes import size_hint as hint_of
        try:
            hint = hint_of(x, fallback=fallback)
        except Exception:  # unbacked, no fallback
            hint = fallback
    return None if hint is None else int(hint)
