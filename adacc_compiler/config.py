"""adacc's options: one frozen dataclass, validated on construction.

Options reach adacc through ``torch.compile(model, backend="adacc", options={...})``.
Environment variables (``ADACC_*``) supply defaults and are read here and
nowhere else; an explicit option always wins over the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from adacc_compiler.plan import noise_power

__all__ = ["AdaccConfig", "parse_bytes", "ENV_VARS", "COMPRESS_MODES"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str) -> int:
    """Parse a size such as ``"1.5GiB"``, ``"800 MB"`` or ``"4096"`` into bytes."""
    match = _BYTES_RE.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"memory_budget: cannot parse {value!r} as a size; expected a number with an "
            f"optional unit ({', '.join(u for u in _UNITS if u)}), e.g. '1.5GiB'"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# Environment variable -> option name. Documented in README.md.
ENV_VARS = {
    "ADACC_MEMORY_BUDGET": "memory_budget",
    "ADACC_PROFILE": "profile",
    "ADACC_CACHE_DIR": "cache_dir",
    "ADACC_DUMP_DIR": "dump_dir",
    "ADACC_SOLVER_TIME_LIMIT": "solver_time_limit",
    "ADACC_SOLVER_MIP_GAP": "solver_mip_gap",
    "ADACC_SHARE_LAYERS": "share_layers",
    "ADACC_COMPRESS": "compress",
    "ADACC_MIN_SQNR_DB": "min_sqnr_db",
    "ADACC_MIN_PLAN_SQNR_DB": "min_plan_sqnr_db",
    "ADACC_COMPRESS_SENSITIVE": "compress_sensitive",
    "ADACC_COMPRESS_CHECKPOINTS": "compress_checkpoints",
    "ADACC_STOCHASTIC_ROUNDING": "stochastic_rounding",
    "ADACC_MULTI_REBUILD": "multi_rebuild",
    "ADACC_RECHECK_AFTER": "recheck_after",
    "ADACC_RECHECK_TOLERANCE_DB": "recheck_tolerance_db",
}

# Accepted values of the ``compress`` option.
COMPRESS_MODES = ("lossy", "lossless", "off")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "adacc")


def _is_off(value: Any) -> bool:
    """``None``, or the strings ``"none"`` / ``"off"`` an option that can be turned off accepts."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off"))


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected a bool (True/False, or '1'/'0' in the environment), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AdaccConfig:
    """Everything that changes what adacc plans or emits.

    Attributes:
        memory_budget: Bound on the peak of live activation memory. A float in
            (0, 1] is a fraction of the bytes stock Inductor saves for backward on
            the same graph; an int is absolute bytes; a string such as ``"1.5GiB"``
            is parsed into bytes.
        profile: Measure each op's time with real tensors on the device that runs
            it (cached on disk). ``False`` uses a roofline estimate instead.
        cache_dir: Where measured costs are cached.
        dump_dir: When set, every compiled graph writes its graphs, plan, solver
            summary and memory timeline here.
        solver_time_limit: Seconds HiGHS may spend on one graph's MILP.
        solver_mip_gap: Relative MIP gap at which HiGHS stops.
        share_layers: Share one decision vector across structurally identical
            layers (the memory rows stay exact).
        verify: Check every plan against an exact liveness simulation of the
            partitioned forward and backward graphs before using it.
        compress: Which codecs the planner may choose next to retain and
            recompute: ``"lossy"`` (every codec a tensor's menu admits and whose
            measured error passes ``min_sqnr_db``), ``"lossless"`` (bit-exact
            codecs only, e.g. 1-bit masks) or ``"off"``.
        min_sqnr_db: A lossy codec is offered for a tensor only if its round trip
            on the tensor's actual values (measured at plan time) keeps at least
            this signal-to-quantisation-noise ratio, in dB. The default, 30,
            admits the int8 codecs (about 35-55 dB on LLM activations) and
            not int4 (about 20 dB): with int4 allowed, 300 steps of
            training at budget 0.25 ended up to 1.25% above stock
            Inductor's loss, against at most 0.5% without it
            (bench/results/train_b025_lr1e3*).
        min_plan_sqnr_db: A bound on the error of the whole plan: the noise
            powers of every value it compresses with a lossy codec, each
            relative to its value's power (``10 ** (-sqnr_db / 10)``), sum
            to at most ``10 ** (-min_plan_sqnr_db / 10)``. ``min_sqnr_db``
            bounds each value alone; the errors of many compressed values
            add up in the gradients. ``None`` (or ``"off"``) lifts the bound.
            The default, 36, with policy evolution (``recheck_after``) on,
            kept 300 steps of training at budget 0.25 within 0.23% of stock
            Inductor's final loss on four seeds
            (bench/results/train_b025_plan36_evolve) and ``adacc train``
            within 0.31%. 33 dB is about 0.4 ms a step cheaper on the 4-layer
            benchmark Llama and kept the four seeds within 0.44%
            (train_b025_plan33_evolve), but of five ``adacc train`` runs with
            it one ended 1.08% above stock Inductor
            (train_demo_b05_plan33_evolve/run3_fresh_clone); 30 dB ended one
            seed 1.24% above (train_b025_plan30_evolve) before values shared
            by all layers were kept lossless, and eight seeds within 0.65%
            since (train_b025_plan30_shared, train_b025_plan30_shared_s4).
        compress_sensitive: Also offer lossy codecs for the tensors attention's
            backward needs and for the residual stream (lossless-only otherwise).
        compress_checkpoints: Also offer codecs to values the backward does
            not read but rebuilds others from (a matrix multiply's output
            whose backward reads only functions of it): kept compressed, the
            backward rebuilds their readers without running the multiply
            again. Cheaper plans, at the price of a larger MILP: on the
            training model at 0.5, 2.77 against 3.35 ms a step estimated,
            solved in 10.5 s against 0.75 s; on the 4-layer benchmark Llama
            at 0.25 the solve takes 11-25 s.
        stochastic_rounding: Lossy codecs round stochastically (seeded per
            tensor) instead of to nearest.
        multi_rebuild: When no plan that rebuilds each recomputed value once
            fits the budget, rebuild values again in each backward region
            that reads them (:mod:`adacc_compiler.multi_rebuild`): smaller
            peaks for more recomputation. ``False`` reports such a budget
            infeasible instead.
        recheck_after: Policy evolution (:mod:`adacc_compiler.evolve`): a
            compiled graph whose plan holds lossy codecs re-measures them on
            its actual values at this call, and again each time after twice
            as many calls (up to every 1024); when they have drifted past
            ``min_sqnr_db`` or ``min_plan_sqnr_db``, it is planned and
            compiled again on the current values. ``None`` (or ``"off"``)
            never checks: the first plan stays.
        recheck_tolerance_db: How far below ``min_sqnr_db`` or
            ``min_plan_sqnr_db`` a check lets a codec or the plan fall
            before it re-plans, in dB (the spread between batches).
    """

    memory_budget: float | int | str = 1.0
    profile: bool = True
    cache_dir: str = dataclasses.field(default_factory=_default_cache_dir)
    dump_dir: str | None = None
    solver_time_limit: float = 10.0
    solver_mip_gap: float = 0.02
    share_layers: bool = True
    verify: bool = True
    compress: str = "lossy"
    min_sqnr_db: float = 30.0
    min_plan_sqnr_db: float | None = 36.0
    compress_sensitive: bool = False
    compress_checkpoints: bool = True
    stochastic_rounding: bool = False
    multi_rebuild: bool = True
    recheck_after: int | None = 10
    recheck_tolerance_db: float = 1.0

    def __post_init__(self) -> None:
        budget = self.memory_budget
        if isinstance(budget, str):
            object.__setattr__(self, "memory_budget", parse_bytes(budget))
        elif isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(
                "memory_budget: expected a fraction in (0, 1], a number of bytes (int) or a "
                f"size string such as '1.5GiB', got {budget!r}"
            )
        elif isinstance(budget, float) and not (0.0 < budget <= 1.0):
            raise ValueError(
                f"memory_budget: a float budget is a fraction and must lie in (0, 1], got {budget!r}; "
                "pass an int or a string such as '2GiB' for absolute bytes"
            )
        elif isinstance(budget, int) and budget <= 0:
            raise ValueError(f"memory_budget: an absolute budget must be positive bytes, got {budget!r}")
        for name in (
            "profile", "share_layers", "verify", "compress_sensitive", "compress_checkpoints", "stochastic_rounding",
            "multi_rebuild",
        ):
            object.__setattr__(self, name, _parse_bool(name, getattr(self, name)))
        try:
            limit = float(self.solver_time_limit)
            gap = float(self.solver_mip_gap)
        except (TypeError, ValueError):
            raise ValueError(
                "solver_time_limit / solver_mip_gap: expected numbers, got "
                f"{self.solver_time_limit!r} / {self.solver_mip_gap!r}"
            ) from None
        if not limit > 0:
            raise ValueError(f"solver_time_limit: expected seconds > 0, got {self.solver_time_limit!r}")
        if not 0 <= gap < 1:
            raise ValueError(f"solver_mip_gap: expected a relative gap in [0, 1), got {self.solver_mip_gap!r}")
        if not isinstance(self.compress, str) or self.compress.strip().lower() not in COMPRESS_MODES:
            raise ValueError(
                f"compress: expected one of {', '.join(map(repr, COMPRESS_MODES))}, got {self.compress!r}"
            )
        object.__setattr__(self, "compress", self.compress.strip().lower())
        try:
            sqnr = float(self.min_sqnr_db)
        except (TypeError, ValueError):
            raise ValueError(f"min_sqnr_db: expected a number of dB, got {self.min_sqnr_db!r}") from None
        if not math.isfinite(sqnr):
            raise ValueError(f"min_sqnr_db: expected a finite number of dB, got {self.min_sqnr_db!r}")
        object.__setattr__(self, "min_sqnr_db", sqnr)
        plan_sqnr = None if _is_off(self.min_plan_sqnr_db) else self.min_plan_sqnr_db
        if plan_sqnr is not None:
            try:
                plan_sqnr = float(plan_sqnr)
            except (TypeError, ValueError):
                plan_sqnr = math.nan
            if isinstance(self.min_plan_sqnr_db, bool) or not math.isfinite(plan_sqnr):
                raise ValueError(
                    "min_plan_sqnr_db: expected a finite number of dB, or None / 'off' for no bound, "
                    f"got {self.min_plan_sqnr_db!r}"
                )
        object.__setattr__(self, "min_plan_sqnr_db", plan_sqnr)
        recheck = None if _is_off(self.recheck_after) else self.recheck_after
        if recheck is not None:
            try:
                parsed = int(recheck) if not isinstance(recheck, (bool, float)) else None
            except (TypeError, ValueError):
                parsed = None
            if parsed is None or parsed < 1:
                raise ValueError(
                    f"recheck_after: expected a positive number of calls, or None / 'off' to never re-check, got {recheck!r}"
                )
            recheck = parsed
        object.__setattr__(self, "recheck_after", recheck)
        try:
            tol = float(self.recheck_tolerance_db)
        except (TypeError, ValueError):
            tol = math.nan
        if isinstance(self.recheck_tolerance_db, bool) or not (0.0 <= tol < math.inf):
            raise ValueError(f"recheck_tolerance_db: expected a finite number of dB >= 0, got {self.recheck_tolerance_db!r}")
        object.__setattr__(self, "recheck_tolerance_db", tol)
        object.__setattr__(self, "solver_time_limit", limit)
        object.__setattr__(self, "solver_mip_gap", gap)
        for name in ("cache_dir", "dump_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name}: expected a path, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))

    @property
    def budget_is_fraction(self) -> bool:
        return isinstance(self.memory_budget, float)

    @property
    def plan_noise_budget(self) -> float:
        """The bound ``min_plan_sqnr_db`` puts on a plan's summed relative noise power (inf: none)."""
        return math.inf if self.min_plan_sqnr_db is None else noise_power(self.min_plan_sqnr_db)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None
    ) -> "AdaccConfig":
        """Build a config from ``torch.compile`` options over ``ADACC_*`` defaults.

        Raises:
            ValueError: for an unknown option (naming the accepted ones) or a bad value.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for var, name in ENV_VARS.items():
            if environ.get(var):
                raw = environ[var]
                if name == "memory_budget":
                    values[name] = _budget_from_env(raw)
                else:
                    values[name] = raw
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown adacc option(s) {', '.join(map(repr, unknown))}; "
                f"accepted options: {', '.join(cls.option_names())}"
            )
        values.update(options)
        return cls(**values)

    def fingerprint(self) -> str:
        """A stable hash of every field that influences the plan."""
        fields = dataclasses.asdict(self)
        fields.pop("dump_dir")  # dumping changes no decision
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _budget_from_env(raw: str) -> float | int | str:
    # "0.4" is a fraction, "1000000" bytes, "1.5GiB" a size.
    text = raw.strip()
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text
