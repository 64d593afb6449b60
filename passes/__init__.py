"""Pure FX passes over the joint forward+backward graph (installed as ``adacc_compiler.passes``).

* ``classify``: forward/backward split, boundary values, candidates, repeated layers.
* ``liveness``: exact activation-memory simulation of a partition; the interval model the MILP uses.
* ``recompute``: the forward/backward split that follows a plan, checked against it.
* ``_torch``: the private PyTorch partitioner helpers, imported in one place.
"""
