"""MILP size and solve time on a Hugging Face Llama joint graph.

    python bench/bench_solver.py --layers 12 --budgets 0.7 0.5 --out bench/results/

Captures the joint forward+backward graph stock Inductor's partitioner
receives (same joint passes), then runs adacc's planner on it at each budget:
the MILP's size, HiGHS's status, objective, bound and gap, the wall time of
the whole solve (refinement rounds included), the peak the plan implies, and
the peak of the exact simulation of its partition. Costs come from the
roofline (``profile=False``, with the fused-value discount the backend
applies) so the numbers do not depend on timing noise; ``--cost-cache DIR``
uses the op times the backend measures instead (timed on this machine on
first use, then read from ``DIR``), with which the MILP's costs are as
uneven as in a compile. ``--highs-seeds 0 1 2``
solves every budget once per HiGHS random seed (``solve_plan(highs_seed=...)``;
adacc uses 0): the branch and bound takes other paths, and the spread of
solve times shows how much one figure can be trusted.
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
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--highs-seeds", type=int, nargs="+", default=[0],
                        help="HiGHS random seeds: each budget is solved once per seed (adacc uses 0)")
    parser.add_argument("--cost-cache", default=None,
                        help="time the ops as the backend does, cached in this directory (default: roofline costs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from llama_joint import llama_joint

    from adacc_compiler.bench import machine_description
    from adacc_compiler.costs import CostModel
    from adacc_compiler.passes.liveness import simulate
    from adacc_compiler.passes.recompute import partition_with_plan
    from adacc_compiler.solver import InfeasibleBudgetError, solve_plan

    joint = llama_joint(args.layers)
    gm, info, stock, seed = joint.gm, joint.info, joint.stock, joint.seed
    costs = joint.recompute_costs(CostModel(profile=args.cost_cache is not None, cache_dir=args.cost_cache))
    rows = []
    print(f"llama {args.layers} layers: {len(gm.graph.nodes)} joint nodes, {len(info.fw_nodes)} forward, "
          f"{len(info.bw_nodes)} backward, {len(info.candidates)} candidates, {info.num_layers} repeated layers "
          f"of {info.layer_period} nodes; stock peak {stock.peak / 2**20:.2f} MiB (capture {joint.capture_s:.0f} s)")
    header = f"{'seed':>4} {'budget':>6} {'status':>18} {'cols':>6} {'rows':>6} {'nnz':>7} {'shared':>6} {'gap':>7} {'solve s':>8} {'plan peak':>10} {'sim peak':>9} {'warm':>5}"
    print(header)
    for highs_seed in args.highs_seeds:
        for fraction in args.budgets:
            budget = int(fraction * stock.peak)
            try:
                res = solve_plan(info, costs, budget_bytes=budget, time_limit=args.time_limit, mip_gap=args.gap,
                                 share_layers=True, seed=seed, highs_seed=highs_seed)
            except InfeasibleBudgetError as err:
                print(f"{highs_seed:4d} {fraction:6.2f} infeasible: {err}")
                rows.append({"highs_seed": highs_seed, "budget": fraction, "status": "infeasible", "error": str(err)})
                continue
            pfw, pbw = partition_with_plan(info, save=res.save, recompute=res.recompute, keep_primals=res.keep_primals)
            sim = simulate(info, pfw, pbw)
            rows.append({
                "highs_seed": highs_seed, "budget": fraction, "budget_bytes": budget, "status": res.status,
                "columns": res.num_columns, "rows": res.num_rows, "nonzeros": res.num_nonzeros,
                "shared_layers": res.shared_layers, "gap": res.gap, "solve_s": res.time_s,
                "objective_s": res.objective_s, "plan_peak": res.predicted_peak, "simulated_peak": sim.peak,
                "fallback": res.fallback, "warm_start": res.warm_start,
            })
            print(f"{highs_seed:4d} {fraction:6.2f} {res.status:>18} {res.num_columns:6d} {res.num_rows:6d} "
                  f"{res.num_nonzeros:7d} {res.shared_layers:6d} {100 * res.gap:6.2f}% {res.time_s:8.2f} "
                  f"{res.predicted_peak / 2**20:9.2f}M {sim.peak / 2**20:8.2f}M {'yes' if res.warm_start else 'no':>5}")
    solved = [r for r in rows if "solve_s" in r]
    if solved:
        within = sum(r["solve_s"] <= 2.0 for r in solved)
        print(f"{within} of {len(solved)} solves within 2 s; slowest {max(r['solve_s'] for r in solved):.2f} s; "
              f"largest gap {100 * max(r['gap'] for r in solved):.2f}%")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = ("" if args.highs_seeds == [0] else "_seeds") + ("_timed" if args.cost_cache else "")
        path = os.path.join(args.out, f"solver_llama{args.layers}{tag}.json")
        with open(path, "w") as f:
            json.dump({"layers": args.layers, "machine": machine_description(),
                       "costs": "timed" if args.cost_cache else "roofline",
                       "stock_peak": stock.peak, "highs_seeds": args.highs_seeds, "rows": rows}, f, indent=2)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
