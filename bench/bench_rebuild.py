#!/usr/bin/env python
"""Multi-rebuild plans on the test MLP: what they cost, and what a step measures.

    python bench/bench_rebuild.py

Part 1 compiles the 12-layer MLP of the end-to-end tests (batch 32, roofline
costs, no codecs) at budgets below what single-rebuild plans reach and
prints the base plan and region size the search chose, with the plan's
estimated recomputation time and predicted peak. Part 2 runs one step at
batch 1024 with stock Inductor, the single-rebuild plan at 0.6 and the
multi-rebuild plan at 0.2, and prints each step's peak of live memory
(``adacc_compiler.measure.peak_memory_bytes``: profiler memory events on the
CPU) next to the plan's predicted activation peak.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    import adacc_compiler
    from adacc_compiler.measure import peak_memory_bytes
    from tests.models import MLP

    base = {"profile": False, "compress": "off"}
    print(f"{'budget':>6} {'est. ms':>8} {'peak/stock':>10}  plan")
    for budget in (0.5, 0.4, 0.3, 0.2):
        torch._dynamo.reset()
        torch.manual_seed(0)
        compiled = torch.compile(
            MLP(), backend="adacc", options={**base, "memory_budget": budget, "cache_dir": tempfile.mkdtemp()}
        )
        torch.manual_seed(1)
        compiled(torch.randn(32, 64)).backward()
        plan = adacc_compiler.last_plan()
        print(f"{budget:6.2f} {plan.estimated_overhead_s * 1e3:8.2f} {plan.predicted_peak_bytes / plan.stock_peak_bytes:10.3f}"
              f"  {plan.solver.fallback or plan.solver.status}", flush=True)

    print(f"\n{'batch 1024':<22} {'measured step peak':>18} {'predicted activation peak':>26}")
    for name, options in (
        ("stock Inductor", None),
        ("single-rebuild, 0.6", {"memory_budget": 0.6, "multi_rebuild": False}),
        ("multi-rebuild, 0.2", {"memory_budget": 0.2}),
    ):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP()
        if options is None:
            compiled = torch.compile(model, backend="inductor")
        else:
            compiled = torch.compile(
                model, backend="adacc", options={**base, **options, "cache_dir": tempfile.mkdtemp()}
            )

        def step():
            torch.manual_seed(1)
            compiled(torch.randn(1024, 64)).backward()

        step()
        model.zero_grad(set_to_none=True)
        peak = peak_memory_bytes(step, device="cpu")
        predicted = f"{adacc_compiler.last_plan().predicted_peak_bytes / 1e6:.2f} MB" if options else "-"
        print(f"{name:<22} {peak / 1e6:15.2f} MB {predicted:>26}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
