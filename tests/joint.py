"""Capture the joint forward+backward graph a partitioner receives, for tests."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from adacc_compiler.passes import _torch as tp


# Module-level: Inductor deep-copies its config (this partitioner included),
# which must not drag fake tensors along.
_CAPTURED: list[tuple[fx.GraphModule, Any, dict]] = []


class _Capture(CustomPartitionerFn):
    def __call__(self, gm, joint_inputs, **kwargs):
        from adacc_compiler.backend import _copy_graph_module

        _CAPTURED.append((_copy_graph_module(gm), joint_inputs, dict(kwargs)))
        return tp.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def uuid(self):
        return None


def capture_joint_graphs(fn: Callable[[], torch.Tensor], module: torch.nn.Module) -> list[tuple[fx.GraphModule, Any, dict]]:
    """Compile ``module`` with stock Inductor, run ``fn`` once, return each joint graph.

    Each entry is ``(prepared joint graph, joint inputs, partitioner kwargs)``.
    """
    capture = _Capture()
    _CAPTURED.clear()

    def backend(gm, example_inputs):
        from torch._functorch import config as functorch_config

        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": capture})

    compiled = torch.compile(module, backend=backend)
    fn(compiled).backward()
    out = []
    for gm, inputs, kwargs in list(_CAPTURED):
        out.append((tp.prepare_joint_graph(gm), inputs, kwargs))
    return out


def trace_joint(
    fn: Callable[..., torch.Tensor], *args: torch.Tensor, static: tuple[int, ...] = (), inductor_decomps: bool = False
):
    """Trace ``fn(*args)`` (returning a scalar loss) into a prepared joint graph, without Inductor.

    Returns ``(joint graph, joint inputs, partitioner kwargs)``; ``static`` lists
    the argument positions that are parameters (static-lifetime inputs).
    ``inductor_decomps`` decomposes ops as Inductor does (``silu_backward``
    into ``sigmoid`` and pointwise ops, for instance).
    """
    from functorch.compile import make_boxed_compiler
    from torch._functorch.aot_autograd import aot_function

    @make_boxed_compiler
    def run_as_is(gm, _inputs):
        return gm

    captured: list = []

    def partition(gm, joint_inputs, **kwargs):
        from adacc_compiler.backend import _copy_graph_module

        kwargs = {**kwargs, "static_lifetime_input_indices": list(static)}
        captured.append((tp.prepare_joint_graph(_copy_graph_module(gm)), joint_inputs, kwargs))
        return tp.default_partition(gm, joint_inputs, num_fwd_outputs=kwargs["num_fwd_outputs"])

    decompositions = None
    if inductor_decomps:
        from torch._inductor.decomposition import select_decomp_table

        decompositions = select_decomp_table()
    compiled = aot_function(
        fn, fw_compiler=run_as_is, bw_compiler=run_as_is, partition_fn=partition, decompositions=decompositions
    )
    compiled(*args).backward()
    assert len(captured) == 1
    return captured[0]
