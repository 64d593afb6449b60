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
