#!/usr/bin/env python
"""The smallest budget each end-to-end test model admits, and its gradients.

    python bench/bench_smallest.py --budget 0.2

Compiles the models of the end-to-end tests (a 12-layer MLP, the small GPT,
the Hugging Face Llama and GPT-2 configs) at ``--budget`` with lossless plans,
as ``tests/e2e.py: run_adacc`` does: a budget the graph cannot meet raises
the error that states the smallest feasible one, and that one is compiled
instead. Prints, per model, the budget compiled (as a fraction of stock
Inductor's activation peak), the gradient error against eager and the
measured saved bytes. The smallest-peak search is node-bounded and adacc
remembers the best plan it found per graph (``cache_dir``), so a fresh cache
can state a larger smallest budget than one that has seen earlier searches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.2)
    args = parser.parse_args()

    import torch

    from tests.e2e import run_adacc
    from tests.models import GPT, MLP, hf_gpt2, hf_llama
    from tests.test_backend import _gpt_loss, _mlp_loss
    from tests.test_hf_models import _lm_loss

    models = (("MLP", MLP, _mlp_loss), ("small GPT", GPT, _gpt_loss), ("HF Llama", hf_llama, _lm_loss),
              ("GPT-2", hf_gpt2, _lm_loss))
    print(f"{'model':<10} {'compiled at':>11} {'grad err':>9} {'measured B':>11} {'budget B':>10}")
    for name, make, loss in models:
        torch._dynamo.reset()
        result = run_adacc(make, loss, args.budget)
        plan = result.plan
        print(f"{name:<10} {plan.budget_bytes / plan.stock_peak_bytes:11.3f} {result.grad_error:9.1e} "
              f"{result.measured_saved:11d} {plan.budget_bytes:10d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
