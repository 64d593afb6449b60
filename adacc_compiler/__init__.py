"""adacc: a torch.compile backend that fits training into a memory budget.

``torch.compile(model, backend="adacc", options={"memory_budget": 0.4})`` plans,
for every activation the backward needs, whether to retain it or recompute it,
as one global MILP under a bound on the peak of live activation memory.

Package map:

* :mod:`adacc_compiler.backend` - the backend entry point and the Inductor
  custom partitioner that drives everything below; the history of plans.
* :mod:`adacc_compiler.config` - :class:`AdaccConfig`, the options and the
  ``ADACC_*`` environment variables.
* :mod:`adacc_compiler.passes` - pure FX passes over the joint graph:
  ``classify`` (forward/backward split, candidates, repeated layers),
  ``liveness`` (memory timelines, exact simulation), ``recompute`` (the split
  that follows the plan), ``compress`` (roles, codec menus), ``rebuild``
  (each backward region rebuilds what it reads).
* :mod:`adacc_compiler.costs` - measured (or roofline) time of each op.
* :mod:`adacc_compiler.solver` - the HiGHS MILP, greedy warm start, fallback.
* :mod:`adacc_compiler.multi_rebuild` - plans for budgets no single-rebuild
  plan meets (base plans x region sizes, judged by the exact simulation).
* :mod:`adacc_compiler.evolve` - policy evolution: a plan's lossy codecs
  re-measured while training, a new plan when they drift.
* :mod:`adacc_compiler.plan` - Plan / Decision types (JSON-serialisable).
* :mod:`adacc_compiler.dump` - graphs, plan, solver summary and timelines on disk.
* :mod:`adacc_compiler.measure` - measured saved bytes, peak memory, step ratios.
* :mod:`adacc_compiler.triton_kernels` - the codec registry.
"""

from adacc_compiler.config import AdaccConfig
from adacc_compiler.plan import Plan

__all__ = ["AdaccConfig", "Plan", "last_plan", "compiled_graphs", "__version__"]
__version__ = "0.1.0"


def last_plan() -> Plan:
    """The plan of the most recently compiled graph in this process."""
    from adacc_compiler.backend import last_plan as _last_plan

    return _last_plan()


def compiled_graphs():
    """Every graph adacc compiled in this process (plan, timelines, config)."""
    from adacc_compiler.backend import compiled_graphs as _compiled_graphs

    return _compiled_graphs()
