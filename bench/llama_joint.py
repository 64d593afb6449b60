"""The benchmark Llama's joint graph with stock Inductor's view of it, for the planner benchmarks.

``bench_solver.py`` and ``bench_pt_plans.py`` run adacc's planner (and
PyTorch's partitioner) on the joint forward+backward graph stock Inductor's
partitioner receives, without compiling anything further. This is that
graph, analysed, with stock Inductor's own partition simulated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch.fx as fx


@dataclass
class LlamaJoint:
    gm: fx.GraphModule
    inputs: Any
    partition_kwargs: dict  # num_fwd_outputs and static_lifetime_input_indices, as the partitioner got them
    info: Any  # adacc_compiler.passes.classify.JointGraphInfo
    stock: Any  # the exact simulation of stock Inductor's partition (MemoryTimeline)
    seed: tuple[set[str], set[str]]  # what stock saves and recomputes: the solver's warm-start seed
    capture_s: float

    def recompute_costs(self, cost_model) -> dict[fx.Node, float]:
        """What the backend charges for recomputing each candidate, from ``cost_model``."""
        return cost_model.recompute_costs([c for c in self.info.candidates if c not in self.info.not_recomputable])


def llama_joint(layers: int) -> LlamaJoint:
    from models import llama
    from tests.joint import capture_joint_graphs

    from adacc_compiler.backend import stock_partition
    from adacc_compiler.passes.classify import analyze_joint_graph
    from adacc_compiler.passes.liveness import partition_choices, simulate

    model, batch = llama(layers)
    t0 = time.perf_counter()
    (gm, inputs, kw), = capture_joint_graphs(lambda m: m(**batch).loss, model)
    capture_s = time.perf_counter() - t0
    part_kw = {"num_fwd_outputs": kw["num_fwd_outputs"],
               "static_lifetime_input_indices": kw["static_lifetime_input_indices"]}
    info = analyze_joint_graph(gm, **part_kw)
    fw, bw = stock_partition(gm, inputs, **part_kw)
    return LlamaJoint(gm=gm, inputs=inputs, partition_kwargs=part_kw, info=info, stock=simulate(info, fw, bw),
                      seed=partition_choices(info, bw), capture_s=capture_s)
