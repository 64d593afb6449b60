"""Pure FX passes over the joint forward+backward graph (installed as ``adacc_compiler.passes``).

* ``classify``: forward/backward split, boundary values, candidates, repeated layers.
* ``liveness``: exact activation-memory simulation of a partition; the interval model the MILP uses.
* ``compress``: each value's role and codec menu, codec error on actual values, encode/decode insertion.
* ``recompute``: the forward/backward split that follows a plan, checked against it.
* ``rebuild``: rewrite a split's backward so each region rebuilds the recomputed values it reads.
* ``_torch``: the private PyTorch partitioner helpers, imported in one place.
"""
