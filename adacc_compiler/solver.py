"""The global retain/recompute MILP, solved with HiGHS.

Model (one joint graph):

* Binary columns per candidate value ``c``: ``save[c]`` (the forward saves it),
  ``recompute[c]`` (the backward rebuilds it) and, for a value with a codec
  menu, one ``compress[c, k]`` per codec ``k`` on it (the forward saves the
  codec's payloads; the backward decodes them just before the value's first
  reader); none of them means it is dropped. A value the backward does not
  read (a checkpoint) is compressed only for a recomputed reader.
  Non-parameter primals get a ``keep[p]`` column (saving an input holds it).
  Views of parameters and broadcast views are never saved (rebuilt for free).
* Every boundary value (read by the backward) is saved, recomputed or
  compressed, one of them at most.
* A recomputed value needs each input available: saved, recomputed,
  compressed (recomputation reads the decoded copy: a compressed checkpoint),
  a parameter, or a kept input.
* A compressed value occupies its payload bytes from the end of the forward
  to its decode, and its full bytes from there to its last reader. Its decode
  runs when the backward first needs it: at its first reader, or earlier when
  a recomputed user pulls it (charged as for a recomputed value, below).
* Memory: each column occupies an interval of the backward schedule
  (:func:`adacc_compiler.passes.liveness.model_intervals`); a saved value is
  live from the end of the forward. A running total ``m_k`` (O(N + T)
  non-zeros) is bounded by the budget at every start point followed by an
  interval's end (the others hold at most what the next such point holds):
  the budget bounds the peak of live activation memory, not the saved sum.
  Where the LP relaxation sits at the budget, the budget row is also written
  out over its columns, which gives HiGHS knapsack cuts the running total
  hides. HiGHS sees bytes in KiB and seconds in milliseconds.
* A recomputed value must exist from the moment its earliest recomputed user
  is rebuilt. Pulls within a small window are counted conservatively; longer
  ones ("far" pairs) get continuous segment columns charged only when both
  ends are recomputed; two far links in a chain are ruled out.
* Objective: the summed time of the recomputed ops plus the encode and decode
  time of the compressed values (seconds per step).
* Structurally identical layers share one decision vector (the same columns;
  first and last layer excepted); the memory rows stay exact.

:func:`solve_plan` judges each solution on the intervals it implies itself
(which track the exact simulation of its partition). An overflowing plan gets
the pairs that caused it banned, or the target lowered, and is solved again;
if no round fits, the smallest-peak plan is the fallback, and when even that
overflows the budget is reported infeasible with the smallest peak found.
HiGHS gets a time limit, a relative gap and a warm start from a greedy plan.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import math
import os
import sys
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.fx as fx

from adacc_compiler.passes.classify import JointGraphInfo
from adacc_compiler.passes.compress import CodecOption
from adacc_compiler.passes.liveness import Intervals, _is_broadcast_view, model_intervals
from adacc_compiler.plan import SolverSummary

log = logging.getLogger(__name__)

# A far-pull segment ends just before the value's own interval starts.
_PULL_EPS = 1e-7
# Head times may sit this far below the modelled head (rounding of chain steps).
_HEAD_SLACK = 1e-3
# The smallest-peak search stops after this many branch-and-bound nodes, or
# after this many times the solver time limit.
_MIN_PEAK_NODES = 2000
_MIN_PEAK_TIME_FACTOR = 4.0
# A decode runs just before the first backward reader of its value.
_DECODE_STEP = 1e-4
# HiGHS sees bytes in KiB and seconds in milliseconds: in raw units the rows
# span 1 to 1e7 and the costs 1e-6 to 1e-2, which HiGHS flags as badly scaled
# and which slows its branch and bound.
_BYTE_UNIT = 1024.0
_TIME_UNIT = 1e-3
# HiGHS's random seed for the cost MILP unless solve_plan is given another.
# Fixed so that a graph gets the same plan every time; bench/bench_solver.py
# varies it to show how solve times spread with the branch-and-bound path.
DEFAULT_HIGHS_SEED = 0
# Node limit of the sub-MILP that refits an earlier round's plan (see _refit),
# and its share of a round's time limit.
_REFIT_NODES = 10
_REFIT_TIME_SHARE = 0.25
# An overflowing round's plan is refitted on its own intervals when it
# overflows them by at most this share of the budget (the refit is the answer
# when within the MIP gap, and otherwise only if no later round fits). Larger
# repairs rarely stay within the gap: on the 12-layer Llama with measured
# costs, a plan 8.3% over (0.45) refitted to a fitting plan 6.7% above the
# round's bound in 0.63 s, while plans 1.6-6% over refitted within it.
_OWN_REFIT_MAX_OVERFLOW = 0.075
# Factor on the pull window of the model solved again when no plan fitted on
# the default one (see solve_plan).
_WIDE_WINDOW = 3.0
# HiGHS's mip_heuristic_effort for the cost MILP (see _solve_once).
_HEURISTIC_EFFORT = 0.3
# A memory point whose LP-relaxed total is within this share of the budget
# gets its budget row written out (see _add_peak_rows).
_TIGHT_POINT = 0.03


__all__ = ["SolveResult", "solve_plan", "InfeasibleBudgetError"]


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget; ``min_feasible_bytes`` is the smallest that does.

    ``plan`` (from the solver) is the smallest-peak plan that figure comes from.
    """

    def __init__(
        self, message: str, *, min_feasible_bytes: int, budget_bytes: int, plan: "SolveResult | None" = None
    ) -> None:
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes
        self.budget_bytes = budget_bytes
        self.plan = plan


@dataclass
class SolveResult:
    save: set[fx.Node]
    recompute: set[fx.Node]
    keep_primals: set[fx.Node]
    status: str
    objective_s: float
    bound_s: float
    gap: float
    time_s: float
    num_columns: int
    num_rows: int
    num_nonzeros: int
    shared_layers: int
    warm_start: bool
    fallback: str | None
    predicted_peak: int
    compress: dict[fx.Node, str] = dataclasses.field(default_factory=dict)

    REMEMBERED = "smallest-peak plan (remembered)"

    @classmethod
    def remembered(cls, *, save, recompute, keep_primals, compress) -> "SolveResult":
        """A plan recalled from an earlier compile (:mod:`adacc_compiler.smallest`), not solved now."""
        return cls(
            save=save, recompute=recompute, keep_primals=keep_primals, compress=compress, status=cls.REMEMBERED,
            objective_s=math.nan, bound_s=math.nan, gap=math.inf, time_s=0.0, num_columns=0, num_rows=0,
            num_nonzeros=0, shared_layers=0, warm_start=False, fallback=None, predicted_peak=0,
        )

    def summary(self) -> SolverSummary:
        """The solver fields a Plan records."""
        return SolverSummary(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SolverSummary)})


def _merge(terms) -> tuple[tuple[int, float], ...]:
    """Sum repeated columns of a row (shared columns repeat; HiGHS wants each once)."""
    coef: dict[int, float] = {}
    for k, c in terms:
        coef[k] = coef.get(k, 0.0) + c
    return tuple(sorted((k, c) for k, c in coef.items() if c != 0.0))


class _Model:
    """Columns, logical rows and memory terms of one MILP, before HiGHS sees it."""

    def __init__(
        self,
        info: JointGraphInfo,
        iv: Intervals,
        costs: dict[fx.Node, float],
        share: bool,
        *,
        exact_heads: bool = False,
        banned_pairs: Sequence[tuple[fx.Node, fx.Node]] = (),
        codec_options: dict[fx.Node, Sequence[CodecOption]] | None = None,
        noise_budget: float = math.inf,
    ):
        self.info = info
        self.banned_pairs = tuple(banned_pairs)
        codec_options = codec_options or {}
        cand = info.candidates
        is_tensor = {c: isinstance(c.meta.get("val"), torch.Tensor) for c in cand}
        is_multi = {c: isinstance(c.meta.get("val"), (list, tuple)) for c in cand}
        self.num_cols = 0
        self.col_cost: list[float] = []
        self.save_col: dict[fx.Node, int] = {}
        self.rec_col: dict[fx.Node, int] = {}
        self.keep_col: dict[fx.Node, int] = {}
        self.comp_col: dict[fx.Node, dict[str, int]] = {}
        # Relative quantisation noise power each column adds to the plan (a
        # shared column: summed over the layers it decides for).
        self.col_noise: list[float] = []
        self.shared_layers = 0

        def new_col(cost: float, noise: float = 0.0) -> int:
            self.col_cost.append(cost)
            self.col_noise.append(noise)
            self.num_cols += 1
            return self.num_cols - 1

        # Which nodes may share a column with their layer-1 twin.
        # The first and last repeated layers keep their own decisions: the last
        # one's backward runs at the memory peak, the first one's at the end.
        template: dict[int, fx.Node] = {}
        if share and info.num_layers > 3:
            for node, (layer, slot) in info.layer_of.items():
                if layer == 1:
                    template[slot] = node
            self.shared_layers = info.num_layers - 2

        def twin(c: fx.Node) -> fx.Node | None:
            if not template or c not in info.layer_of:
                return None
            layer, slot = info.layer_of[c]
            t = template.get(slot)
            if layer in (0, 1, info.num_layers - 1) or t is None:
                return None
            if t not in self.save_col and t not in self.rec_col:
                return None
            return t

        def menu_key(n: fx.Node) -> tuple:
            return tuple((o.codec, o.nbytes) for o in codec_options.get(n, ()))

        # Only values that can matter get columns: tensors and multi-output ops.
        self.relevant = [c for c in cand if is_tensor[c] or is_multi[c]]
        boundary = set(info.boundary)
        # Templates first: the backward reaches layer 1 after the later layers.
        templates = set(template.values())
        for c in sorted(self.relevant, key=lambda n: n not in templates):
            t = twin(c)
            can_rec = c not in info.not_recomputable
            # Views of parameters and broadcast views (expand) are rebuilt for
            # free; saved, Inductor may or may not materialise them, so their
            # saved size is not known in advance. Their bases are saved instead.
            can_save = is_tensor[c] and not (can_rec and (c in info.param_aliases or _is_broadcast_view(c)))
            opts = codec_options.get(c, ()) if is_tensor[c] else ()
            if t is not None and (can_save == (t in self.save_col)) and (can_rec == (t in self.rec_col)) and (
                (c in boundary) == (t in boundary)
            ) and menu_key(c) == menu_key(t):
                if can_save:
                    self.save_col[c] = self.save_col[t]
                if can_rec:
                    self.rec_col[c] = self.rec_col[t]
                if can_rec:
                    self.col_cost[self.rec_col[c]] += costs.get(c, 0.0)
                if opts:
                    self.comp_col[c] = dict(self.comp_col[t])
                    for o in opts:
                        self.col_cost[self.comp_col[c][o.codec]] += o.cost_s
                        self.col_noise[self.comp_col[c][o.codec]] += o.noise
                continue
            if can_save:
                self.save_col[c] = new_col(0.0)
            if can_rec:
                self.rec_col[c] = new_col(costs.get(c, 0.0))
            if opts:
                self.comp_col[c] = {o.codec: new_col(o.cost_s, o.noise) for o in opts}
        relevant = set(self.relevant)
        for p in info.primals:
            if p not in info.param_primals and isinstance(p.meta.get("val"), torch.Tensor):
                if any(u in relevant or u in info.bw_pos for u in p.users):
                    self.keep_col[p] = new_col(0.0)

        # Logical rows: list of (indices, coefs, lower, upper). Shared columns make
        # duplicate rows; they are removed by a set.
        rows: set[tuple[tuple[tuple[int, float], ...], float, float]] = set()
        infeasible_reasons: list[str] = []
        for c in self.relevant:
            r = self.rec_col.get(c)
            ways = self.ways(c)
            if len(ways) > 1:
                rows.add((tuple((k, 1.0) for k in ways), -math.inf, 1.0))
            if c in boundary:
                terms = tuple((k, 1.0) for k in ways)
                if not terms:
                    infeasible_reasons.append(c.name)
                    continue
                rows.add((terms, 1.0, math.inf))
            elif c in self.comp_col:
                # A checkpoint is stored compressed only for a recomputed reader.
                readers = tuple((self.rec_col[u], -1.0) for u in c.users if u in self.rec_col)
                rows.add((tuple((k, 1.0) for k in self.comp_col[c].values()) + readers, -math.inf, 0.0))
            if r is None:
                continue
            for a in c.all_input_nodes:
                if a in self.keep_col:
                    rows.add((((self.keep_col[a], 1.0), (r, -1.0)), 0.0, math.inf))
                elif a in self.save_col or a in self.rec_col or a in self.comp_col:
                    terms = tuple((k, 1.0) for k in self.sources(a) + [self.save_col.get(a)] if k is not None)
                    rows.add((terms + ((r, -1.0),), 0.0, math.inf))
        for p, k in self.keep_col.items():
            if p in boundary:
                rows.add((((k, 1.0),), 1.0, math.inf))

        assert not infeasible_reasons, f"boundary values with no way to be available: {infeasible_reasons}"
        # The plan's summed quantisation noise, in units of the noise budget
        # (the coefficients are 1e-6..1e-3 of a signal's power).
        if math.isfinite(noise_budget):
            assert noise_budget > 0, noise_budget
            noisy = tuple((k, v / noise_budget) for k, v in enumerate(self.col_noise) if v > 0)
            if noisy:
                rows.add((noisy, -math.inf, 1.0))
        self.logical_rows = sorted({(kept, lo, hi) for terms, lo, hi in rows if (kept := _merge(terms))})

        # Memory terms: (column, bytes, start point, end point) on backward positions.
        terms: list[tuple[int, int, float, float]] = []
        extra_rows: list[tuple[list[tuple[int, float]], float, float]] = []
        self.pull_cols: set[int] = set()
        for c in self.relevant:
            if c in self.save_col and iv.bytes_saved.get(c, 0) and iv.last_saved[c] >= 0:
                terms.append((self.save_col[c], iv.bytes_saved[c], -1.0, iv.last_saved[c]))
            if c in self.rec_col and iv.bytes_recomputed.get(c, 0) and iv.need[c] != math.inf:
                terms.append((self.rec_col[c], iv.bytes_recomputed[c], iv.need[c], iv.last_recomputed[c]))
            if c in self.comp_col:
                readers = [float(info.bw_pos[u]) for u in c.users if u in info.bw_pos]
                # Decoded when first needed: by its first reader, or by the
                # recomputed users the intervals count as pulling it (a
                # checkpoint has only those).
                decode = min(min(readers, default=math.inf) - _DECODE_STEP, iv.need[c])
                end = max(max(readers, default=-1.0), iv.last_recomputed[c])
                if decode == math.inf:
                    # A checkpoint no recomputation can read: its column
                    # only costs time, so no plan takes it.
                    continue
                for o in codec_options[c]:
                    col = self.comp_col[c][o.codec]
                    terms.append((col, o.nbytes, -1.0, decode))
                    terms.append((col, info.nbytes.get(c, 0), decode, end))
        for p, k in self.keep_col.items():
            last = max(
                [float(info.bw_pos[u]) for u in p.users if u in info.bw_pos]
                + [iv.need[u] for u in p.users if u in iv.need and iv.need[u] != math.inf]
                + [0.0]
            )
            terms.append((k, info.nbytes.get(p, 0), -1.0, last))
        # Far pulls: a value rebuilt (or decoded) for a user recomputed long
        # before the value's own first reader lives from that rebuild on. Per
        # value and size, the far users sorted by rebuild time give segments;
        # z[j] ("alive in segment j") is forced by the value being available
        # that way together with any user i <= j recomputed.
        self.pull_fill: list[tuple[int, tuple[int, ...], int, int | None]] = []  # z, sources, r_w, z_prev
        far_by_value: dict[fx.Node, list[fx.Node]] = {}
        for c, w in iv.far_edges:
            if (c in self.rec_col or c in self.comp_col) and w in self.rec_col:
                far_by_value.setdefault(c, []).append(w)
        for c, users in far_by_value.items():
            users.sort(key=lambda w: iv.need[w])
            bounds = [iv.need[w] for w in users] + [iv.need[c]]
            # A recomputed view allocates nothing; a decoded one is a tensor.
            by_size: dict[int, list[int]] = {}
            if c in self.rec_col and iv.bytes_recomputed.get(c, 0):
                by_size.setdefault(iv.bytes_recomputed[c], []).append(self.rec_col[c])
            for col in self.comp_col.get(c, {}).values():
                if info.nbytes.get(c, 0):
                    by_size.setdefault(info.nbytes[c], []).append(col)
            for size, sources in by_size.items():
                prev = None
                for j, w in enumerate(users):
                    z = new_col(0.0)
                    self.pull_cols.add(z)
                    for src in sources:
                        extra_rows.append(([(z, 1.0), (src, -1.0), (self.rec_col[w], -1.0)], -1.0, math.inf))
                    if prev is not None:
                        extra_rows.append(([(z, 1.0), (prev, -1.0)], 0.0, math.inf))
                    self.pull_fill.append((z, tuple(sources), self.rec_col[w], prev))
                    if bounds[j + 1] > bounds[j]:
                        terms.append((z, size, bounds[j], bounds[j + 1] - _PULL_EPS))
                    prev = z
        # Two far links in a row (a value pulled by a user that is itself
        # pulled far ahead) would be charged only from the middle user's own
        # head: such chains are ruled out, so the charge stays exact.
        far_users = {c: set(ws) for c, ws in far_by_value.items()}
        for c, ws in far_users.items():
            for w in ws:
                for w2 in far_users.get(w, ()):
                    for src in self.sources(c):
                        extra_rows.append(
                            ([(src, 1.0), (self.rec_col[w], 1.0), (self.rec_col[w2], 1.0)], -math.inf, 2.0)
                        )
        # Head times keep the model exact: h[c] (when c is rebuilt) must lie
        # before every recomputed user's head, at or before c's first reader,
        # and no earlier than the head the intervals above account for. A
        # recompute chain that would pull a value further is thereby ruled out.
        big = float(iv.num_bw + 2)
        self.head_col: dict[fx.Node, int] = {}
        self.head_bounds: list[tuple[int, float, float]] = []
        lower = dict(iv.need)
        for c, users in far_by_value.items():
            lower[c] = min(lower[c], min(iv.need[w] for w in users))
        first_reader = {}
        for c in self.relevant:
            if c in self.rec_col and iv.need[c] != math.inf:
                direct = [float(info.bw_pos[u]) for u in c.users if u in info.bw_pos]
                first_reader[c] = min(direct) if direct else big
        if not exact_heads:
            first_reader = {}
        for c in sorted(first_reader, key=lambda n: -info.order[n]):
            k = new_col(0.0)
            self.pull_cols.add(k)
            self.head_col[c] = k
            self.head_bounds.append((k, lower[c] - _HEAD_SLACK, first_reader[c]))
        # (head, save column or None, users' heads, users' recompute columns, first reader)
        self.head_order = [
            (
                self.head_col[c],
                self.save_col.get(c),
                [self.head_col[w] for w in c.users if w in self.head_col],
                [self.rec_col[w] for w in c.users if w in self.head_col],
                first_reader[c],
            )
            for c in sorted(first_reader, key=lambda n: -info.order[n])
        ]
        for c, hc in self.head_col.items():
            sc = self.save_col.get(c)
            for w in c.users:
                if w not in self.head_col:
                    continue
                # h[c] - h[w] + big * r[w] - big * s[c] <= big
                terms_h = [(hc, 1.0), (self.head_col[w], -1.0), (self.rec_col[w], big)]
                if sc is not None:
                    terms_h.append((sc, -big))
                extra_rows.append((terms_h, -math.inf, big))
        # Pairs whose recompute pulled a value past what the model accounts
        # for, found by judging earlier plans on their own intervals.
        for c, w in banned_pairs:
            if c in self.rec_col and w in self.rec_col:
                extra_rows.append(([(self.rec_col[c], 1.0), (self.rec_col[w], 1.0)], -math.inf, 1.0))
        for row_terms, lo, hi in extra_rows:
            if kept := _merge(row_terms):
                self.logical_rows.append((kept, lo, hi))
        # The running total only changes where an interval starts, and the
        # memory at a start point followed by no end before the next start is
        # at most the memory there: only points where some interval ends are
        # bounded (a third fewer rows on a Llama joint graph).
        starts = sorted({-1.0} | {t[2] for t in terms})
        spans = []
        for col, size, start, end in terms:
            a = bisect.bisect_left(starts, start)
            b = bisect.bisect_right(starts, end) - 1
            if b >= a:
                spans.append((col, size, a, b))
        kept = sorted({b for _, _, _, b in spans})
        self.points = [starts[k] for k in kept]
        self.mem_terms = []
        for col, size, a, b in spans:
            a2 = bisect.bisect_left(kept, a)
            b2 = bisect.bisect_right(kept, b) - 1
            if b2 >= a2:
                self.mem_terms.append((col, size, a2, b2))

    def sources(self, c: fx.Node) -> list[int]:
        """Columns that make ``c`` available to recomputation other than saving it."""
        rec = [self.rec_col[c]] if c in self.rec_col else []
        return rec + list(self.comp_col.get(c, {}).values())

    @functools.cached_property
    def input_needs(self) -> list[tuple[int, list[tuple[int | None, tuple[int, ...], int | None, int | None]]]]:
        """Per recomputed value: its column and, per input, how the input is made available.

        Each input is ``(keep, avail, save, recompute)``: the keep column of a
        kept primal (else None); or the columns any of which make it
        available (:meth:`ways`), and its save and recompute columns. Built
        once per model: the greedy closes thousands of trial plans over it.
        """
        needs = []
        for c, r in self.rec_col.items():
            reqs = []
            for a in c.all_input_nodes:
                if a in self.keep_col:
                    reqs.append((self.keep_col[a], (), None, None))
                elif a in self.save_col or a in self.rec_col or a in self.comp_col:
                    reqs.append((None, tuple(self.ways(a)), self.save_col.get(a), self.rec_col.get(a)))
            needs.append((r, reqs))
        return needs

    def ways(self, c: fx.Node) -> list[int]:
        """Every decision column of ``c``: save, recompute, and one per codec."""
        save = [self.save_col[c]] if c in self.save_col else []
        return save + self.sources(c)

    def vector(self, save: set, recompute: set, keep: set, compress: dict | None = None) -> np.ndarray:
        x = np.zeros(self.num_cols)
        for c, name in (compress or {}).items():
            x[self.comp_col[c][name]] = 1
        for c in save:
            x[self.save_col[c]] = 1
        for c in recompute:
            x[self.rec_col[c]] = 1
        for p in keep:
            x[self.keep_col[p]] = 1
        return x


    # -- evaluation helpers (greedy, warm start, fallback) --
    def decisions(self, x: np.ndarray) -> tuple[set, set, set, dict]:
        """(save, recompute, keep, compress) of a solution vector."""
        save = {c for c, k in self.save_col.items() if x[k] > 0.5}
        recompute = _needed(self.info, {c for c, k in self.rec_col.items() if x[k] > 0.5})
        keep = {p for p, k in self.keep_col.items() if x[k] > 0.5}
        compress = {c: name for c, cols in self.comp_col.items() for name, k in cols.items() if x[k] > 0.5}
        return save, recompute, keep, compress

    def model_peak(self, x: np.ndarray) -> float:
        return float(self.memory_profile(x).max(initial=0.0))

    def memory_profile(self, x: np.ndarray) -> np.ndarray:
        for hc, sc, user_heads, user_recs, first in self.head_order:
            # As the MILP's rows: recomputed users pull the head of a value
            # that is not saved (recomputed or decoded for them).
            pulled = [x[h] for h, r in zip(user_heads, user_recs) if x[r] > 0.5]
            x[hc] = min([first, *pulled]) if sc is None or x[sc] < 0.5 else first
        for z, sources, rw, prev in self.pull_fill:
            pulled = x[rw] > 0.5 and any(x[k] > 0.5 for k in sources)
            x[z] = 1.0 if pulled or (prev is not None and x[prev] > 0.5) else 0.0
        delta = np.zeros(len(self.points) + 1)
        for col, size, a, b in self.mem_terms:
            if x[col] > 0.5:
                delta[a] += size
                delta[b + 1] -= size
        return np.cumsum(delta)[:-1]

    def logical_ok(self, x: np.ndarray) -> bool:
        self.memory_profile(x)  # fills the derived columns
        for k, lo, hi in self.head_bounds:
            if x[k] < lo - 1e-9 or x[k] > hi + 1e-9:
                return False
        for terms, lo, hi in self.logical_rows:
            v = sum(x[k] * c for k, c in terms)
            if v < lo - 1e-9 or v > hi + 1e-9:
                return False
        return True


def _needed(info: JointGraphInfo, recompute: set[fx.Node]) -> set[fx.Node]:
    """The recomputed values the backward uses: read by it, or by another such value.

    A solution may switch on a recompute column nothing reads (it costs the
    smallest-peak search almost nothing); the partition would drop it as dead
    code, so the plan does not list it.
    """
    boundary = set(info.boundary)
    needed: set[fx.Node] = set()
    for c in sorted(recompute, key=lambda n: -info.order[n]):
        if c in boundary or any(u in needed for u in c.users):
            needed.add(c)
    return needed


def _seeded(model: _Model, seed: tuple[set[str], set[str]]) -> np.ndarray | None:
    """The columns of a known plan (names of the values it saves and recomputes), if the model admits it."""
    saved, recomputed = seed
    x = np.zeros(model.num_cols)
    for c, k in model.save_col.items():
        if c.name in saved:
            x[k] = 1
    for c, k in model.rec_col.items():
        if c.name in recomputed and not (c in model.save_col and c.name in saved):
            x[k] = 1
    for p, k in model.keep_col.items():
        if p.name in saved:
            x[k] = 1
    return x if _close(model, x) and model.logical_ok(x) else None


def _checkpoint_layers(model: _Model, x: np.ndarray, budget: float) -> np.ndarray:
    """Recompute whole repeated layers, one at a time, until the model's peak fits.

    Activation checkpointing in the MILP's columns: everything inside a layer
    that only the same layer reads is recomputed; what the next layer reads
    (the residual stream) stays as it was. A layer is kept only if it lowers
    (peak, total) of the memory profile.
    """
    info = model.info
    current = _peak_area(model, x)
    members: dict[int, list[fx.Node]] = {}
    for c, (layer, _) in info.layer_of.items():
        readers = [u for u in c.users if u in model.rec_col or u in model.save_col]
        if c in model.rec_col and all(info.layer_of.get(u, (None,))[0] == layer for u in readers):
            members.setdefault(layer, []).append(c)
    for layer in sorted(members):
        if current[0] <= budget:
            break
        trial = x.copy()
        for c in members[layer]:
            if c in model.save_col:
                trial[model.save_col[c]] = 0
            trial[model.rec_col[c]] = 1
        if not _close(model, trial):
            continue
        new = _peak_area(model, trial)
        if new < current and model.logical_ok(trial):
            x, current = trial, new
    return x


def _greedy(
    model: _Model,
    budget: float,
    seed: tuple[set[str], set[str]] | None = None,
    previous: SolveResult | None = None,
    *,
    refit_time_limit: float = math.inf,
    highs_seed: int = DEFAULT_HIGHS_SEED,
) -> np.ndarray | None:
    """A plan under ``budget`` if a simple search finds one.

    Starts from ``seed`` (stock Inductor's partition) when the model admits
    it, else from saving every boundary value. From there it recomputes
    single values, or checkpoints whole layers and then recomputes single
    values. ``previous`` is the plan of an earlier round on the same graph
    (which overflowed its own intervals): repaired for this round's bans and
    refitted under the new target (:func:`_refit`, within
    ``refit_time_limit`` seconds), it is a third candidate, close to this
    round's optimum where the first two are not. The cheapest plan that fits
    wins.
    """
    info = model.info
    boundary = set(info.boundary)
    x = _seeded(model, seed) if seed is not None else None
    if x is None:
        x = np.zeros(model.num_cols)
        for c in model.relevant:
            if c in boundary:
                if c in model.save_col:
                    x[model.save_col[c]] = 1
                else:
                    x[model.rec_col[c]] = 1
        for p, k in model.keep_col.items():
            if p in boundary:
                x[k] = 1
        # Close recomputed multi-output values (their inputs must be available).
        if not _close(model, x):
            return None
    # Single values first (cheap where a few suffice, as at mild budgets), or
    # whole layers first (where most must go): the cheaper plan that fits wins.
    best = None
    single = _single_moves(model, x.copy(), budget)
    layers = _single_moves(model, _checkpoint_layers(model, x.copy(), budget), budget)
    plans = [single, layers]
    if previous is not None:
        repaired = _repaired(model, previous)
        if repaired is not None:
            completed = _refit(model, repaired, budget, time_limit=refit_time_limit, highs_seed=highs_seed)
            if completed is not None:
                plans.append(completed)
    for plan in plans:
        key = (model.model_peak(plan) > budget, float(np.dot(model.col_cost, plan)))
        if (best is None or key < best[0]) and model.logical_ok(plan):
            best = (key, plan)
    return None if best is None else best[1]


def _repaired(model: _Model, previous: SolveResult) -> np.ndarray | None:
    """An earlier round's plan made admissible in ``model``, or None.

    The rounds differ by banned recompute pairs (and by intervals, which do
    not touch admissibility): of a banned pair both recomputed, the pulled
    value is saved instead when it can be, else its user.
    """
    x = model.vector(previous.save, previous.recompute, previous.keep_primals, previous.compress)
    for c, w in model.banned_pairs:
        rc, rw = model.rec_col.get(c), model.rec_col.get(w)
        if rc is None or rw is None or x[rc] < 0.5 or x[rw] < 0.5:
            continue
        for v, r in ((c, rc), (w, rw)):
            if v in model.save_col:
                x[r] = 0
                x[model.save_col[v]] = 1
                break
        else:
            return None
    return x if _close(model, x) and model.logical_ok(x) else None


def _refit(
    model: _Model, x: np.ndarray, budget: float, *, time_limit: float = math.inf, highs_seed: int = DEFAULT_HIGHS_SEED
) -> np.ndarray | None:
    """``x`` changed only where it overflows ``budget``: a small MILP over the values alive there.

    Every decision column whose memory terms miss the points where ``x``
    peaks over the budget keeps its value; the others (and the derived
    columns) are free. HiGHS solves that sub-problem under a node limit;
    its plan, when it finds one, is a warm start for the whole MILP.
    """
    profile = model.memory_profile(x)
    over = profile > budget
    if not over.any():
        return x
    hot = np.concatenate([[0], np.cumsum(over)])  # hot[b + 1] - hot[a]: overflow points in [a, b]
    free = set(model.pull_cols) | set(model.head_col.values())
    for col, _, a, b in model.mem_terms:
        if hot[b + 1] > hot[a]:
            free.add(col)
    # A value's columns move together (save one way, recompute or decode another).
    for c in model.relevant:
        cols = model.ways(c)
        if any(k in free for k in cols):
            free.update(cols)
    h, _, _, _ = _build_highs(model, budget, minimise_peak=False)
    fixed = np.array([k for k in range(model.num_cols) if k not in free], dtype=np.int32)
    if len(fixed):
        h.changeColsBounds(len(fixed), fixed, x[fixed], x[fixed])
    h.setOptionValue("presolve", "off")
    h.setOptionValue("mip_max_nodes", _REFIT_NODES)
    if math.isfinite(time_limit):
        h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", 0.01)
    h.setOptionValue("random_seed", int(highs_seed))
    h.run()
    if h.getInfo().primal_solution_status != 2:
        return None
    y = np.round(np.array(h.getSolution().col_value[: model.num_cols]))
    return y if model.logical_ok(y) and model.model_peak(y) <= budget else None


def _single_moves(model: _Model, x: np.ndarray, budget: float) -> np.ndarray:
    """Recompute saved values one at a time while the peak is over ``budget``.

    Each step looks at the point where the plan peaks and takes the move that
    frees the most bytes there per second of recomputation (bytes the value's
    save column holds at that point, less what its recomputation holds
    there), among those that lower the plan's (peak, total).
    """
    cover: dict[int, list[tuple[int, int, int]]] = {}
    for col, size, a, b in model.mem_terms:
        cover.setdefault(col, []).append((size, a, b))

    def held(col: int, k: int) -> int:
        return sum(size for size, a, b in cover.get(col, ()) if a <= k <= b)

    # save column -> recompute column of the same value
    moves = {s: model.rec_col[c] for c, s in model.save_col.items() if model.rec_col.get(c, s) != s}
    current = _peak_area(model, x)
    tried: set[tuple[int, int]] = set()
    while current[0] > budget:
        k = int(np.argmax(model.memory_profile(x)))
        ranked = []
        for s, r in moves.items():
            if x[s] < 0.5 or (s, k) in tried:
                continue
            gain = held(s, k) - held(r, k)
            if gain > 0:
                ranked.append((gain / (model.col_cost[r] + 1e-9), s, r))
        if not ranked:
            break
        ranked.sort(key=lambda o: -o[0])
        for _, s, r in ranked:
            tried.add((s, k))
            trial = x.copy()
            trial[s] = 0
            trial[r] = 1
            if not _close(model, trial):
                continue
            new = _peak_area(model, trial)
            if new < current:
                x, current = trial, new
                break
        else:
            break
    return x


def _peak_area(model: _Model, x: np.ndarray) -> tuple[float, float]:
    """(peak, total) of a plan's memory profile, compared in that order by the greedy's moves.

    A peak held at several points drops only once each is relieved, so a move
    that keeps the peak but frees memory elsewhere counts as progress; the pair
    only decreases, so the moves cannot cycle.
    """
    profile = model.memory_profile(x)
    return float(profile.max(initial=0.0)), float(profile.sum())


def _close(model: _Model, x: np.ndarray) -> bool:
    """Make every recomputed value's inputs available by saving (or recomputing) them."""
    needs = model.input_needs
    changed = True
    while changed:
        changed = False
        for r, reqs in needs:
            if x[r] < 0.5:
                continue
            for keep, avail, s, ra in reqs:
                if keep is not None:
                    if x[keep] < 0.5:
                        x[keep] = 1
                        changed = True
                    continue
                if any(x[k] > 0.5 for k in avail):
                    continue
                if s is not None and s != r:
                    x[s] = 1
                elif ra is not None and ra != r:
                    x[ra] = 1
                else:
                    return False
                changed = True
    return True


_highs_banner_done = False


def _new_highs():
    """A silent HiGHS instance.

    The first instance in a process prints HiGHS's banner on the C-level
    stdout before any option can be set; it would interleave with the user's
    output on every compile, so it goes to /dev/null.
    """
    import highspy

    global _highs_banner_done
    if _highs_banner_done:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _highs_banner_done = True
    h.setOptionValue("output_flag", False)
    return h


def _build_highs(model: _Model, budget: float, *, minimise_peak: bool):
    import highspy

    h = _new_highs()
    n = model.num_cols
    npts = len(model.points)
    inf = highspy.kHighsInf
    # Columns: decisions, then one m_k per point, then (peak mode) the peak M.
    col_cost = np.array(model.col_cost) / _TIME_UNIT
    costs = np.concatenate([col_cost * (0.0 if minimise_peak else 1.0), np.zeros(npts)])
    lower = np.zeros(n + npts)
    upper = np.concatenate([np.ones(n), np.full(npts, inf if minimise_peak else budget / _BYTE_UNIT)])
    if minimise_peak:
        costs = np.concatenate([costs, [1.0]])
        lower = np.concatenate([lower, [0.0]])
        upper = np.concatenate([upper, [inf]])
        # Tie-break toward cheap plans among the smallest-peak ones.
        costs[:n] = col_cost * 1e-6
    for k, lo, hi in model.head_bounds:
        lower[k] = lo
        upper[k] = hi
    ncols = len(costs)
    h.addCols(ncols, costs, lower, upper, 0, np.array([], dtype=np.int32), np.array([], dtype=np.int32), np.array([]))
    integer = np.array([k for k in range(n) if k not in model.pull_cols], dtype=np.int32)
    h.changeColsIntegrality(len(integer), integer, np.full(len(integer), highspy.HighsVarType.kInteger))

    row_lo: list[float] = []
    row_hi: list[float] = []
    starts: list[int] = []
    idx: list[int] = []
    val: list[float] = []

    def add_row(terms, lo, hi):
        starts.append(len(idx))
        for k, c in _merge(terms):
            idx.append(k)
            val.append(c)
        row_lo.append(-inf if lo == -math.inf else lo)
        row_hi.append(inf if hi == math.inf else hi)

    for terms, lo, hi in model.logical_rows:
        add_row(terms, lo, hi)
    adds: list[list[tuple[int, float]]] = [[] for _ in range(npts + 1)]
    for col, size, a, b in model.mem_terms:
        adds[a].append((col, -size / _BYTE_UNIT))
        adds[b + 1].append((col, size / _BYTE_UNIT))
    for k in range(npts):
        terms = [(n + k, 1.0)] + adds[k]
        if k > 0:
            terms.append((n + k - 1, -1.0))
        add_row(terms, 0.0, 0.0)
        if minimise_peak:
            add_row([(n + k, 1.0), (ncols - 1, -1.0)], -inf, 0.0)
    status = h.addRows(
        len(row_lo),
        np.array(row_lo),
        np.array(row_hi),
        len(idx),
        np.array(starts, dtype=np.int32),
        np.array(idx, dtype=np.int32),
        np.array(val),
    )
    if status != highspy.HighsStatus.kOk:
        raise RuntimeError(f"adacc internal error: HiGHS rejected the model's rows ({status})")
    return h, ncols, len(row_lo), len(idx)


def _add_peak_rows(h, model: _Model, budget: float) -> int:
    """Spell out the budget row at every point where the LP relaxation sits at the budget.

    The running total ``m_k`` keeps the memory rows at O(N + T) non-zeros,
    but it hides their knapsack structure: HiGHS derives cover cuts from a
    row that lists the items and their sizes, and a chain of equalities over
    continuous totals gives it none. The LP relaxation's tight points are
    where the integer plan has to give something up, so the explicit row
    (every column live there, in bytes, at most the budget) is added there
    only. The rows are implied by the model: they change its cuts, not its
    solutions. On a 12-layer Llama joint graph (18 budgets, three HiGHS
    seeds) the slowest solve to a 2% gap went from 3.5 s to 1.4 s, and the
    hardest budget (0.65) from 2.0-2.2 s to 0.9-1.4 s
    (``bench/bench_solver.py``). Returns the number of rows added.
    """
    import highspy

    n = model.num_cols
    npts = len(model.points)
    h.setOptionValue("solve_relaxation", True)
    h.run()
    h.setOptionValue("solve_relaxation", False)
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return 0
    totals = np.asarray(h.getSolution().col_value[n : n + npts]) * _BYTE_UNIT
    rows = _point_rows(model, np.flatnonzero(totals >= budget * (1.0 - _TIGHT_POINT)))
    for row in rows.values():
        idx = np.array(sorted(row), dtype=np.int32)
        h.addRow(-highspy.kHighsInf, budget / _BYTE_UNIT, len(idx), idx, np.array([row[k] / _BYTE_UNIT for k in idx]))
    return len(rows)


def _point_rows(model: _Model, points: np.ndarray) -> dict[int, dict[int, float]]:
    """Per memory point (index into ``model.points``): the bytes each column holds there."""
    rows: dict[int, dict[int, float]] = {int(k): {} for k in points}
    for col, size, a, b in model.mem_terms:
        for j in range(np.searchsorted(points, a), np.searchsorted(points, b, side="right")):
            row = rows[int(points[j])]
            row[col] = row.get(col, 0.0) + size
    return rows


def _warm_start(h, model: _Model, x: np.ndarray, extra: list[float] | None = None) -> None:
    import highspy

    m = model.memory_profile(x) / _BYTE_UNIT
    sol = highspy.HighsSolution()
    sol.col_value = list(x) + list(m) + [e / _BYTE_UNIT for e in extra or []]
    sol.value_valid = True
    h.setSolution(sol)


def _min_peak_solution(model: _Model, *, time_limit: float) -> tuple[np.ndarray, float]:
    """The plan with the smallest peak in the model (ties broken by time), and the solver's bound."""
    import highspy

    h, _, _, _ = _build_highs(model, math.inf, minimise_peak=True)
    # The smallest feasible budget an error states must come out the same when
    # the user compiles again at it, also on a loaded machine: the search is
    # bounded by a node count (deterministic), with the time limit as a
    # backstop only.
    h.setOptionValue("time_limit", float(_MIN_PEAK_TIME_FACTOR * time_limit))
    h.setOptionValue("mip_max_nodes", _MIN_PEAK_NODES)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("mip_rel_gap", 1e-3)
    # Saving everything the backward reads is always a plan: HiGHS starts from
    # it, so a time limit still leaves an answer.
    start = _greedy(model, math.inf)
    if start is not None:
        _warm_start(h, model, start, extra=[float(model.model_peak(start))])
    h.run()
    if h.getInfo().primal_solution_status != 2:
        status = h.modelStatusToString(h.getModelStatus())
        raise RuntimeError(f"adacc: could not compute the smallest feasible budget ({status})")
    x = np.round(np.array(h.getSolution().col_value[: model.num_cols]))
    return x, float(h.getInfo().mip_dual_bound) * _BYTE_UNIT


def own_peak(
    info: JointGraphInfo,
    costs,
    save: set,
    recompute: set,
    keep: set,
    compress: dict | None = None,
    codec_options: dict | None = None,
) -> int:
    """The peak a plan implies on its own intervals (what its partition's simulation sees)."""
    own = _Model(info, model_intervals(info, recompute), costs, False, codec_options=codec_options)
    return int(own.model_peak(own.vector(save, recompute, keep, compress)))


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic garbage collector off for the duration (as it was after).

    The planner allocates many short-lived containers; each allocation burst
    triggers a collection that walks the whole heap, which in a compile holds
    the model, its graphs and the compiler's state. On the 12-layer Llama
    benchmark, after 17 earlier solves in the process, collections took
    0.5 s of a 2.05-2.6 s solve. What the planner leaves in cycles is
    collected once the collector is back on.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_cyclic_gc_paused()
def solve_plan(
    info: JointGraphInfo,
    costs: dict[fx.Node, float],
    *,
    budget_bytes: int,
    time_limit: float,
    mip_gap: float,
    share_layers: bool,
    max_rounds: int = 8,
    codec_options: dict[fx.Node, Sequence[CodecOption]] | None = None,
    seed: tuple[set[str], set[str]] | None = None,
    highs_seed: int = DEFAULT_HIGHS_SEED,
    noise_budget: float = math.inf,
) -> SolveResult:
    """Choose retain / recompute / compress / drop for every candidate under ``budget_bytes``.

    ``codec_options`` lists, per value the backward reads, the codecs it may
    take (with their payload bytes and encode + decode time). ``seed`` names
    the values a known plan saves and recomputes (stock Inductor's partition):
    the greedy warm start begins there. ``highs_seed`` is HiGHS's random
    seed for the cost MILPs (the smallest-peak search always uses 0).
    ``noise_budget`` bounds the plan's summed relative quantisation noise:
    the sum of ``10 ** (-sqnr_db / 10)`` over every value it gives a lossy
    codec (one MILP row over the compress columns).

    The MILP's intervals charge recompute chains one link at a time, so a plan
    is then judged on the intervals it implies itself; if that peak overflows,
    the MILP's target is lowered by the overflow and it is solved again. When
    no round fits, the exact-head model and then the rounds on a wider pull
    window are tried; then the smallest-peak plan is used if it fits;
    otherwise the budget is infeasible and the error states the smallest peak
    reached.
    """
    t0 = time.perf_counter()
    iv = model_intervals(info, window=_window(info))
    rounds = dict(
        time_limit=time_limit, mip_gap=mip_gap, share_layers=share_layers, max_rounds=max_rounds,
        codec_options=codec_options, seed=seed, highs_seed=highs_seed, noise_budget=noise_budget,
    )
    fitted, res, timed_out = _learning_rounds(info, iv, costs, budget_bytes, **rounds)
    if fitted is not None:
        fitted.time_s = time.perf_counter() - t0
        return fitted
    # The exact-head model admits fewer recompute chains and charges them
    # closely: its cheapest plan under the budget comes before the
    # smallest-peak fallback. It is judged on its own intervals too; an
    # overshoot lowers the target below that plan's model peak.
    target = budget_bytes
    for _ in range(0 if timed_out else 3):
        try:
            res = _solve_once(
                info, iv, costs, target, time_limit, mip_gap, share_layers, (), codec_options,
                exact_heads=True, seed=seed, previous=res, highs_seed=highs_seed, noise_budget=noise_budget,
            )
        except (_NoPlanInTime, _ModelInfeasible) as stop:
            log.debug("exact-head MILP: no plan (%s)", type(stop).__name__)
            break
        model_peak = res.predicted_peak
        res.predicted_peak = own_peak(info, costs, res.save, res.recompute, res.keep_primals, res.compress, codec_options)
        log.debug(
            "exact-head MILP target %d: model peak %d, own-interval peak %d (budget %d)",
            target,
            model_peak,
            res.predicted_peak,
            budget_bytes,
        )
        if res.predicted_peak <= budget_bytes:
            res.time_s = time.perf_counter() - t0
            return res
        target = min(target, model_peak) - (res.predicted_peak - budget_bytes)
    # The rounds again on a wider pull window: a model that charges more
    # pulls up front can find a plan where the learning rounds drifted into
    # plans that overflow their own intervals (seen on a 4-layer Llama at 0.25
    # with compression, where the tighter model found none and the wider one
    # fitted in two rounds).
    if not timed_out:
        wide = model_intervals(info, window=_WIDE_WINDOW * _window(info))
        fitted, _, timed_out = _learning_rounds(info, wide, costs, budget_bytes, **rounds)
        if fitted is not None:
            log.debug("plan found on the wider pull window")
            fitted.time_s = time.perf_counter() - t0
            return fitted
    # Fall back to the smallest-peak plan: from the exact-head model or from
    # the MILP's own model, whichever peaks lower on its own intervals.
    best = None
    for exact in (True, False):
        model = _Model(
            info, iv, costs, False, exact_heads=exact, codec_options=codec_options, noise_budget=noise_budget
        )
        x, _ = _min_peak_solution(model, time_limit=time_limit)
        save, recompute, keep, compress = model.decisions(x)
        peak = own_peak(info, costs, save, recompute, keep, compress, codec_options)
        log.debug(
            "smallest-peak plan (%s heads): model peak %d, own-interval peak %d",
            "exact" if exact else "windowed",
            int(model.model_peak(x)),
            peak,
        )
        if best is None or peak < best[0]:
            best = (peak, save, recompute, keep, compress, model, x)
    # The smallest-peak plan does not depend on the budget: the error below
    # carries it, and the backend states the smallest budget from its exact
    # simulation (and remembers it, see adacc_compiler.smallest).
    smallest, save, recompute, keep, compress, model, x = best
    plan = SolveResult(
        save=save,
        recompute=recompute,
        keep_primals=keep,
        status="smallest-peak plan",
        objective_s=float(np.dot(model.col_cost, x)),
        bound_s=float("nan"),
        gap=float("inf"),
        time_s=time.perf_counter() - t0,
        num_columns=res.num_columns if res else model.num_cols,
        num_rows=res.num_rows if res else len(model.logical_rows),
        num_nonzeros=res.num_nonzeros if res else 0,
        shared_layers=0,
        warm_start=False,
        fallback=(
            f"HiGHS stopped without a plan ({timed_out})" if timed_out else "no MILP round fitted on its own intervals"
        )
        + "; the smallest-peak plan fits",
        predicted_peak=smallest,
        compress=compress,
    )
    if smallest > budget_bytes:
        raise InfeasibleBudgetError(
            f"memory budget of {budget_bytes} bytes is infeasible; the smallest budget adacc finds feasible is "
            f"{smallest} bytes",
            min_feasible_bytes=smallest,
            budget_bytes=budget_bytes,
            plan=plan,
        )
    return plan


def _learning_rounds(
    info: JointGraphInfo,
    iv: Intervals,
    costs: dict[fx.Node, float],
    budget_bytes: int,
    *,
    time_limit: float,
    mip_gap: float,
    share_layers: bool,
    max_rounds: int,
    codec_options,
    seed,
    highs_seed: int,
    noise_budget: float,
) -> tuple[SolveResult | None, SolveResult | None, str | None]:
    """The MILP on intervals ``iv``, re-solved on what its plans show until one fits.

    Returns the plan that fits its own intervals (or None), the last round's
    plan (a warm start for what follows) and HiGHS's status if a round
    stopped without any plan.
    """
    target = budget_bytes
    banned: list[tuple[fx.Node, fx.Node]] = []
    res = None
    closest: SolveResult | None = None  # the round that overshot least
    timed_out: str | None = None  # HiGHS's status when a round stopped without any plan
    # The model's intervals, with the heads and tails plans showed (see below).
    learning = dataclasses.replace(iv, need=dict(iv.need), last_recomputed=dict(iv.last_recomputed))
    last_bans = 0
    fallback: SolveResult | None = None  # a refitted plan that fits, though outside the gap
    for _ in range(max_rounds):
        try:
            res = _solve_once(
                info, learning, costs, target, time_limit, mip_gap, share_layers, banned, codec_options, seed=seed,
                previous=res, highs_seed=highs_seed, noise_budget=noise_budget,
            )
        except _NoPlanInTime as stop:
            # The smallest-peak plan below is the answer (or the infeasibility
            # error): a plan that fits is not dropped for want of time.
            log.info(
                "adacc: HiGHS stopped without a plan (%s) after %.1f s; using the smallest-peak plan "
                "(raise solver_time_limit to let the MILP search longer)",
                stop,
                time_limit,
            )
            timed_out = str(stop)
            break
        except _ModelInfeasible:
            log.debug("MILP target %d with %d banned pairs: infeasible", target, len(banned))
            if not last_bans or res is None:
                break
            # The bans left no plan: lift them and lower the target instead,
            # by the smallest overshoot seen.
            banned.clear()
            last_bans = 0
            target -= max(1, closest.predicted_peak - budget_bytes)
            if target <= 0:
                break
            continue
        own_iv = model_intervals(info, res.recompute)
        own = _Model(info, own_iv, costs, False, codec_options=codec_options, noise_budget=noise_budget)
        x_own = own.vector(res.save, res.recompute, res.keep_primals, res.compress)
        profile = own.memory_profile(x_own)
        res.predicted_peak = int(profile.max(initial=0.0))
        log.debug("MILP target %d: own-interval peak %d (budget %d)", target, res.predicted_peak, budget_bytes)
        if res.predicted_peak <= budget_bytes:
            return res, res, timed_out
        if closest is None or res.predicted_peak < closest.predicted_peak:
            closest = res
        refitted = None
        if res.predicted_peak <= budget_bytes * (1 + _OWN_REFIT_MAX_OVERFLOW):
            refitted = _refit_on_own_intervals(
                info, own, x_own, res, costs, budget_bytes, codec_options,
                time_limit=_REFIT_TIME_SHARE * time_limit, highs_seed=highs_seed,
            )
        if refitted is not None and refitted.gap <= mip_gap:
            # Within the gap of this round's bound: no later round, whose
            # learned intervals only charge more, can do better by more.
            return refitted, res, timed_out
        if refitted is not None and (fallback is None or refitted.objective_s < fallback.objective_s):
            fallback = refitted
        # Learn from the plan where it overflows; lower the target only when
        # there is nothing left to learn.
        over = [own.points[k] for k in range(len(own.points)) if profile[k] > budget_bytes]
        # A compressed value's decoded copy is pulled like a recomputed value.
        pulled = set(res.recompute) | set(res.compress)
        learned = _learn_overflowing_intervals(learning, own_iv, pulled, over)
        log.debug("learned %d heads/tails from the plan's own intervals", learned)
        if learned:
            continue
        # Ban the pulls that put values alive where the plan overflows.
        new = []
        for c in res.recompute:
            w = own_iv.puller.get(c)
            if w is None or own_iv.need[c] >= iv.need.get(c, math.inf):
                continue
            if any(own_iv.need[c] <= t <= own_iv.last_recomputed[c] for t in over) and (c, w) not in banned:
                new.append((c, w))
        last_bans = len(new)
        if new:
            banned.extend(new)
            continue
        target -= res.predicted_peak - budget_bytes
        if target <= 0:
            break
    return fallback, res, timed_out


def _learn_overflowing_intervals(
    learning: Intervals, own: Intervals, recomputed: set[fx.Node], over: Sequence[float]
) -> int:
    """Move ``learning``'s heads and tails to a plan's own where that plan overflows; how many moved.

    A recomputed value (or the decoded copy of a compressed one) whose own
    interval covers an overflow point in
    ``over`` is charged from then on with the head (and tail) that interval
    showed, which a chain of pulls may have moved past what the windowed
    model assumed. Intervals that grew where the plan fits overflowed nothing
    and are not learned: charged in every later round, they made its plans
    dearer (on the 4-layer Llama at 0.3, 8.98 against 8.74 ms estimated).
    """
    learned = 0
    for c in recomputed:
        if not any(own.need[c] <= t <= own.last_recomputed[c] for t in over):
            continue
        if own.need[c] < learning.need[c] - _PULL_EPS:
            learning.need[c] = own.need[c]
            learned += 1
        if own.last_recomputed[c] > learning.last_recomputed[c]:
            learning.last_recomputed[c] = own.last_recomputed[c]
            learned += 1
    return learned


def _refit_on_own_intervals(
    info: JointGraphInfo,
    own: _Model,
    x: np.ndarray,
    res: SolveResult,
    costs,
    budget_bytes: int,
    codec_options,
    *,
    time_limit: float,
    highs_seed: int,
) -> SolveResult | None:
    """``res`` (overflowing its own intervals ``own``) refitted where it overflows, if that fits.

    :func:`_refit` frees only the columns alive where the plan peaks over the
    budget. The refitted plan implies intervals of its own again, so it
    counts only if it fits on those.
    """
    y = _refit(own, x, float(budget_bytes), time_limit=time_limit, highs_seed=highs_seed)
    if y is None:
        return None
    save, recompute, keep, compress = own.decisions(y)
    peak = own_peak(info, costs, save, recompute, keep, compress, codec_options)
    objective = float(np.dot(own.col_cost, y))
    log.debug("refit of an overflowing plan: own-interval peak %d, %.3f ms", peak, objective * 1e3)
    if peak > budget_bytes:
        return None
    bound = res.bound_s
    gap = (objective - bound) / objective if objective > 0 and math.isfinite(bound) else float("inf")
    return dataclasses.replace(
        res,
        save=save,
        recompute=recompute,
        keep_primals=keep,
        compress=compress,
        objective_s=objective,
        gap=max(0.0, gap),
        fallback="a round's plan refitted where it overflowed its own intervals",
        predicted_peak=peak,
    )


class _ModelInfeasible(Exception):
    """The MILP (with its current target) has no solution."""


class _NoPlanInTime(Exception):
    """HiGHS stopped (time limit) before finding any plan, and the greedy one does not fit."""


def _window(info: JointGraphInfo) -> float:
    """How far ahead of its first reader a value is assumed pulled without charge.

    Pulls within the window are counted conservatively (always); longer ones
    are charged exactly, per pair, only when the pair is recomputed. A few
    percent of a layer's share of the backward keeps the model both close to
    the exact simulation and small.
    """
    layers = max(info.num_layers, 1)
    return max(2.0, 0.03 * len(info.bw_nodes) / layers)


def _solve_once(
    info: JointGraphInfo,
    iv: Intervals,
    costs: dict[fx.Node, float],
    budget_bytes: int,
    time_limit: float,
    mip_gap: float,
    share_layers: bool,
    banned: Sequence[tuple[fx.Node, fx.Node]] = (),
    codec_options: dict[fx.Node, Sequence[CodecOption]] | None = None,
    *,
    exact_heads: bool = False,
    seed: tuple[set[str], set[str]] | None = None,
    previous: SolveResult | None = None,
    highs_seed: int = DEFAULT_HIGHS_SEED,
    noise_budget: float = math.inf,
) -> SolveResult:
    import highspy

    t0 = time.perf_counter()
    model = _Model(
        info,
        iv,
        costs,
        share_layers,
        banned_pairs=banned,
        codec_options=codec_options,
        exact_heads=exact_heads,
        noise_budget=noise_budget,
    )
    budget = float(budget_bytes)
    greedy = _greedy(
        model, budget, seed, previous, refit_time_limit=_REFIT_TIME_SHARE * time_limit, highs_seed=highs_seed
    )
    greedy_fits = greedy is not None and model.model_peak(greedy) <= budget
    h, ncols, nrows, nnz = _build_highs(model, budget, minimise_peak=False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    h.setOptionValue("random_seed", int(highs_seed))
    # HiGHS's presolve finds little to remove in these rows and its reductions
    # slow the branch and bound: on a 12-layer Llama joint graph the solves
    # to a 2% gap take 0.4-2.1 s without it against 2.2-2.7 s with it
    # (bench/bench_solver.py).
    h.setOptionValue("presolve", "off")
    # The LP bound can sit a few percent under the optimum and rise only by
    # branching; the gap then closes once a near-optimal plan is known, and
    # more effort on HiGHS's primal heuristics (default 0.05) finds it early:
    # 12-layer Llama at 0.55, HiGHS seed 2, 3.7 s at the default, 1.1 s at 0.3.
    h.setOptionValue("mip_heuristic_effort", _HEURISTIC_EFFORT)
    # Cuts separated at the nodes rarely move the bound here (the root's do
    # not either: the gap closes by branching) and each node pays for them.
    # Off, on a 12-layer Llama joint graph (18 budgets, HiGHS seeds 0 and 1,
    # two measured-cost caches and roofline costs, 108 solves): slowest 1.79 s
    # against 2.17 s, mean 0.55 s against 0.56 s (bench/bench_solver.py).
    h.setOptionValue("mip_allow_cut_separation_at_nodes", False)
    nrows += _add_peak_rows(h, model, budget)
    nnz = h.getNumNz()
    if greedy_fits:
        _warm_start(h, model, greedy)
    h.run()
    status = h.getModelStatus()
    hinfo = h.getInfo()
    status_name = h.modelStatusToString(status)
    has_solution = hinfo.primal_solution_status == 2
    fallback = None
    if not has_solution and not greedy_fits:
        if share_layers and model.shared_layers:
            # Shared layer decisions can rule out a plan that exists per node.
            log.debug("no plan with shared layer decisions (%s); solving per node", status_name)
            return _solve_once(
                info, iv, costs, budget_bytes, time_limit, mip_gap, False, banned, codec_options,
                exact_heads=exact_heads, seed=seed, previous=previous, highs_seed=highs_seed,
                noise_budget=noise_budget,
            )
        if status != highspy.HighsModelStatus.kInfeasible:
            raise _NoPlanInTime(status_name)
        raise _ModelInfeasible()
    if has_solution:
        x = np.round(np.array(h.getSolution().col_value[: model.num_cols]))
        objective = float(hinfo.objective_function_value) * _TIME_UNIT
        bound = float(hinfo.mip_dual_bound) * _TIME_UNIT
        gap = float(hinfo.mip_gap)
    else:
        assert greedy is not None
        x = greedy
        fallback = f"solver stopped without a solution ({status_name}); greedy plan used"
        objective = float(np.dot(model.col_cost, x))
        bound = float("nan")
        gap = float("inf")
    if not model.logical_ok(x):
        raise RuntimeError(
            f"adacc internal error: the {'MILP' if has_solution else 'greedy'} plan ({status_name}) violates "
            "the availability constraints"
        )
    save, recompute, keep, compress = model.decisions(x)
    peak = int(model.model_peak(x))
    return SolveResult(
        save=save,
        recompute=recompute,
        keep_primals=keep,
        status=status_name,
        objective_s=objective,
        bound_s=bound,
        gap=gap if math.isfinite(gap) else float("inf"),
        time_s=time.perf_counter() - t0,
        num_columns=ncols,
        num_rows=nrows,
        num_nonzeros=nnz,
        shared_layers=model.shared_layers,
        warm_start=greedy_fits,
        fallback=fallback,
        predicted_peak=peak,
        compress=compress,
    )
