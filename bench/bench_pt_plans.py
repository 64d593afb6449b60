"""PyTorch's budgeted partitions judged by adacc's own model, next to adacc's plans.

    python bench/bench_pt_plans.py --layers 4 --budgets 0.5 0.3 --cost-cache /tmp/costs

Captures the joint graph of the benchmark Llama, partitions it with stock
Inductor's min-cut partitioner under ``activation_memory_budget`` (what the
``pt<budget>`` variants of ``adacc bench`` run), and reports, per budget:

* what PyTorch's partition keeps (saved bytes) and its peak of live
  activation memory by adacc's exact simulation (the quantity adacc's budget
  bounds), and what its recomputation costs by adacc's cost model;
* adacc's plan at the same fractional budget and at PyTorch's simulated
  peak: the MILP objective (estimated extra seconds per step).

Set against ``adacc bench``'s measured step times for the same variants, it
shows where the cost model and the machine disagree: a partition whose
measured overhead is below its modelled cost recomputes things the model
over-charges. ``--cost-cache`` points at the cost cache a bench run used, so
both see the same op timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--cost-cache", default=None, help="adacc's op-cost cache (default: time afresh, no cache)")
    parser.add_argument("--no-profile", action="store_true", help="roofline op costs instead of timing each op")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    from torch._functorch import config as functorch_config

    from llama_joint import llama_joint

    from adacc_compiler.backend import _copy_graph_module
    from adacc_compiler.costs import CostModel
    from adacc_compiler.passes import _torch as tp
    from adacc_compiler.passes.liveness import partition_choices, simulate
    from adacc_compiler.solver import solve_plan

    joint = llama_joint(args.layers)
    gm, info, stock, seed = joint.gm, joint.info, joint.stock, joint.seed
    costs = joint.recompute_costs(CostModel(profile=not args.no_profile, cache_dir=args.cost_cache))
    by_name = {n.name: n for n in gm.graph.nodes}

    def adacc_objective(budget: int) -> float:
        res = solve_plan(info, costs, budget_bytes=budget, time_limit=10.0, mip_gap=0.02, share_layers=True,
                         seed=seed)
        return res.objective_s

    rows = []
    mib = 2.0**20
    print(f"llama {args.layers} layers: stock peak {stock.peak / mib:.2f} MiB")
    print(f"{'budget':>6} {'PT saved':>9} {'PT peak':>8} {'PT model ms':>11} "
          f"{'adacc@budget ms':>15} {'adacc@PT peak ms':>16}")
    for fraction in args.budgets:
        with functorch_config.patch(activation_memory_budget=fraction):
            pfw, pbw = tp.min_cut_rematerialization_partition(_copy_graph_module(gm), joint.inputs,
                                                              compiler="inductor", **joint.partition_kwargs)
        tl = simulate(info, pfw, pbw)
        _, recomputed = partition_choices(info, pbw)
        pt_cost = sum(costs.get(by_name[n], 0.0) for n in recomputed if n in by_name)
        row = {
            "budget": fraction,
            "pt_saved_bytes": tl.saved_bytes,
            "pt_peak_bytes": tl.peak,
            "pt_recomputed": len(recomputed),
            "pt_model_cost_s": pt_cost,
            "adacc_at_budget_s": adacc_objective(int(fraction * stock.peak)),
            "adacc_at_pt_peak_s": adacc_objective(tl.peak),
        }
        rows.append(row)
        print(f"{fraction:6.2f} {tl.saved_bytes / mib:8.2f}M {tl.peak / mib:7.2f}M {pt_cost * 1e3:11.2f} "
              f"{row['adacc_at_budget_s'] * 1e3:15.2f} {row['adacc_at_pt_peak_s'] * 1e3:16.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"layers": args.layers, "stock_peak_bytes": stock.peak, "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
