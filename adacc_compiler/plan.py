"""The plan: one decision per candidate activation, JSON-serialisable.

A *candidate* is a forward value that the backward could need: either directly
(the stock backward reads it) or as an input of a value that is recomputed.
Each candidate ends up ``retain`` (saved by the forward for the backward),
``recompute`` (rebuilt in the backward from other available values),
``compress`` (the forward saves it encoded by a codec; the backward decodes
it just before its first use) or ``drop`` (nothing in the backward needs it
under this plan).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["noise_power", "combined_sqnr_db", "RETAIN", "RECOMPUTE", "COMPRESS", "DROP", "CHOICES", "Decision", "SolverSummary", "Plan", "MemoryTimeline"]

RETAIN = "retain"
RECOMPUTE = "recompute"
COMPRESS = "compress"
DROP = "drop"
CHOICES = (RETAIN, RECOMPUTE, COMPRESS, DROP)


def noise_power(sqnr_db: float) -> float:
    """Quantisation noise power relative to the signal's, for an SQNR in dB."""
    return 10.0 ** (-sqnr_db / 10.0)


def combined_sqnr_db(sqnrs_db: Iterable[float]) -> float:
    """The SQNR of several values' errors together: their relative noise powers summed, in dB.

    ``inf`` when none adds noise; ``-inf`` when one is unbounded (``-inf`` dB).
    """
    noise = sum(noise_power(db) for db in sqnrs_db)
    if noise == 0:
        return math.inf
    return -math.inf if math.isinf(noise) else -10.0 * math.log10(noise)


@dataclass(frozen=True)
class Decision:
    """What happens to one forward value."""

    name: str  # node name in the joint graph
    shape: tuple[Any, ...]
    dtype: str
    nbytes: int
    producer: str  # the aten op that produces it
    choice: str
    cost_s: float  # estimated time to recompute it once (whether or not it is)
    layer: int | None = None  # index of the repeated block it belongs to, if any
    needed_by_backward: bool = False  # read directly by the stock backward
    # Compression: the tensor's role, the rule that set its codec menu, the
    # codecs offered (with the SQNR each kept on the actual values, in dB;
    # None for lossless ones), and for a compressed tensor the codec chosen,
    # its stored bytes and its encode + decode time.
    role: str = ""
    rule: str = ""
    menu: dict[str, float | None] = field(default_factory=dict)
    codec: str | None = None
    compressed_nbytes: int | None = None
    codec_cost_s: float | None = None
    # How many times the backward computes a recomputed value: 1 unless a
    # multi-rebuild plan rebuilds it again in later regions.
    rebuilds: int | None = None

    def __post_init__(self) -> None:
        assert self.choice in CHOICES, self.choice
        assert (self.choice == COMPRESS) == (self.codec is not None), (self.choice, self.codec)

    @property
    def sqnr_db(self) -> float | None:
        """Measured SQNR of the chosen codec (None: lossless or not compressed)."""
        return self.menu.get(self.codec) if self.codec else None


@dataclass(frozen=True)
class SolverSummary:
    status: str
    objective_s: float
    bound_s: float
    gap: float
    time_s: float
    num_columns: int
    num_rows: int
    num_nonzeros: int
    shared_layers: int  # how many repeated blocks share one decision vector
    warm_start: bool
    fallback: str | None = None  # why a non-MILP plan was used, if one was


@dataclass
class Plan:
    """The decisions for one compiled graph and what they predict."""

    graph_id: str
    budget_bytes: int
    stock_saved_bytes: int  # what stock Inductor saves for backward on this graph
    stock_peak_bytes: int  # stock Inductor's peak of live activation memory (the fraction's reference)
    predicted_saved_bytes: int  # bytes the planned forward saves for backward
    predicted_peak_bytes: int  # peak of live activation memory over fw+bw
    estimated_overhead_s: float  # extra time per step the plan adds
    decisions: list[Decision]
    solver: SolverSummary
    fixed_saved_bytes: int = 0  # saved inputs that are not parameters (cannot be dropped)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in CHOICES}
        for d in self.decisions:
            out[d.choice] += 1
        return out

    def plan_sqnr_db(self) -> float:
        """The plan's combined SQNR: its lossy values' relative noise powers summed, in dB (inf: none)."""
        return combined_sqnr_db(d.sqnr_db for d in self.decisions if d.sqnr_db is not None)

    def by_name(self) -> dict[str, Decision]:
        return {d.name: d for d in self.decisions}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        raw["decisions"] = [
            Decision(**{**d, "shape": tuple(d["shape"])}) for d in raw["decisions"]
        ]
        raw["solver"] = SolverSummary(**raw["solver"])
        return cls(**raw)

    def table(self, *, only_relevant: bool = True) -> str:
        """A fixed-width table: tensor, shape, dtype, bytes, producer, decision, cost."""
        rows = [
            d
            for d in self.decisions
            if not only_relevant or d.choice != DROP or d.needed_by_backward
        ]
        header = ("tensor", "shape", "dtype", "bytes", "producer", "layer", "role", "decision", "codec", "ratio", "sqnr (dB)", "est. cost (us)")
        body = [
            (
                d.name,
                "x".join(str(s) for s in d.shape) or "scalar",
                d.dtype.replace("torch.", ""),
                str(d.nbytes),
                d.producer,
                "-" if d.layer is None else str(d.layer),
                d.role or "-",
                f"{d.choice} x{d.rebuilds}" if (d.rebuilds or 1) > 1 else d.choice,
                d.codec or "-",
                f"{d.nbytes / d.compressed_nbytes:.2f}x" if d.compressed_nbytes else "-",
                "lossless" if d.codec and d.sqnr_db is None else f"{d.sqnr_db:.1f}" if d.sqnr_db is not None else "-",
                f"{(d.codec_cost_s if d.choice == COMPRESS else d.cost_s) * 1e6:.1f}",
            )
            for d in rows
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
        return "\n".join(lines)


@dataclass
class MemoryTimeline:
    """Live activation bytes after each event of one forward+backward schedule.

    ``labels[i]`` names the node executed at event ``i``; ``phases[i]`` is
    ``"forward"`` or ``"backward"``; ``live_bytes[i]`` counts the bytes of values
    the backward needs (saved or recomputed) that are alive after event ``i``.
    """

    labels: list[str]
    phases: list[str]
    live_bytes: list[int]

    def __post_init__(self) -> None:
        assert len(self.labels) == len(self.phases) == len(self.live_bytes)

    @property
    def peak(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def saved_bytes(self) -> int:
        """Live bytes at the end of the forward: what the forward saves."""
        last_fw = [b for b, p in zip(self.live_bytes, self.phases) if p == "forward"]
        return last_fw[-1] if last_fw else 0
