"""Measurements shared by the tests and the benchmarks.

Everything here measures what actually happens at run time, independently of
adacc's own planner and cost model, so the numbers can be used to check it:

* :func:`saved_activation_bytes` -- the bytes autograd keeps for backward,
  seen through ``torch.autograd.graph.saved_tensors_hooks``.  The pack hook
  fires for every tensor saved by eager autograd *and* by a ``torch.compile``'d
  model (AOTAutograd saves its residuals through ``ctx.save_for_backward``), so
  the same function measures eager, Inductor and adacc alike, without
  recompiling anything.
* :func:`peak_memory_bytes` -- the peak of live memory during a step above the
  level at entry (CUDA allocator statistics, or profiler memory events on CPU).
* :func:`grad_relative_error` -- ``||g_other - g_ref|| / ||g_ref||`` over all
  parameters.
* :func:`interleaved_step_ratios` -- step times of several already-compiled
  variants measured side by side in one process, in interleaved rounds, and
  reported as the median over rounds of the per-round ratio to a baseline.
  This is the only way speed is reported in this project: absolute times on a
  shared machine drift, ratios taken in the same round mostly do not.
  Each ratio comes with a 95% bootstrap interval of that median
  (:func:`median_interval`), so a difference between two variants, or between
  a run and a saved baseline, can be told apart from the run's own noise.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "saved_activation_bytes",
    "peak_memory_bytes",
    "grad_relative_error",
    "interleaved_step_ratios",
    "median_interval",
    "storage_key",
]

log = logging.getLogger(__name__)

_MEMORY_EVENT_NAME = "[memory]"


# --------------------------------------------------------------------------
# Saved activations
# --------------------------------------------------------------------------


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """``(data_ptr, nbytes)`` of the storage behind ``t``; ``None`` if it has none.

    Views of one tensor share a storage and hence a key.  Tensors without a
    real storage (sparse, nested, wrapper subclasses, meta/fake) give ``None``.
    """
    try:
        if t.device.type == "meta" or t.is_sparse or t.is_nested:
            return None
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None


def saved_activation_bytes(
    fn: Callable[[], torch.Tensor],
    *,
    exclude: Iterable[torch.Tensor] = (),
) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    ``fn`` runs a forward pass (typically ``lambda: model(**batch).loss``).
    Every tensor the pack hook of ``torch.autograd.graph.saved_tensors_hooks``
    sees is collected (the hook returns it unchanged, so nothing about the run
    changes); tensors are de-duplicated by storage (``data_ptr``), so a tensor
    saved by two nodes, or two views of one buffer, count once, with the full
    ``nbytes`` of their storage.  Storages of the tensors in ``exclude`` (pass
    the model's parameters and buffers, and the inputs if they should not
    count) are left out.

    Returns an ``int``, not ``(bytes, loss)``: the graph built by ``fn`` is
    dropped when this function returns, no backward is run.  A caller who wants
    the loss can capture it in the closure.

    Notes:
      * Storages whose ``data_ptr`` is 0 (empty) add 0 bytes.
      * Tensors without a plain storage (sparse, nested, subclasses) are
        counted as ``numel * element_size`` each, without de-duplication.
      * Activation checkpointing (``torch.utils.checkpoint``) is measured
        correctly: what a checkpointed region would save is not saved (the
        non-reentrant variant hides it behind its own, inner saved-tensor
        hooks; the reentrant one runs the region under no_grad), and the
        region's tensor inputs, which checkpointing keeps through
        ``ctx.save_for_backward``, are seen and counted (both variants;
        checked in tests/test_measure.py).
    """
    excluded: set[int] = set()
    for t in exclude:
        key = storage_key(t)
        if key is not None and key[0] != 0:
            excluded.add(key[0])

    # data_ptr -> (nbytes, tensor). Holding the tensor keeps the storage alive
    # until we return, so its address cannot be reused by a later saved tensor
    # (possible in eager when a node not on the path to the loss is freed).
    seen: dict[int, tuple[int, torch.Tensor]] = {}
    unkeyed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is None:
            unkeyed.append(t)
        else:
            ptr, nbytes = key
            if ptr != 0 and ptr not in excluded and ptr not in seen:
                seen[ptr] = (nbytes, t)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn()
    del out

    total = sum(n for n, _ in seen.values())
    total += sum(t.numel() * t.element_size() for t in unkeyed)
    log.debug(
        "saved_activation_bytes: %d storages, %d unkeyed tensors, %d bytes",
        len(seen),
        len(unkeyed),
        total,
    )
    seen.clear()
    unkeyed.clear()
    return int(total)


# --------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_memory_events(prof: torch.profiler.profile) -> list[tuple[int, int]]:
    """``(time_ns, nbytes)`` of the CPU allocations (+) and frees (-) recorded."""
    from torch.autograd import DeviceType

    cpu_types = {DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP}
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.name() != _MEMORY_EVENT_NAME:
            continue
        if e.device_type() not in cpu_types:
            continue
        out.append((e.start_ns(), e.nbytes()))
    return out


def peak_memory_bytes(
    fn: Callable[[], object], *, device: torch.device | str | None = None
) -> int:
    """Peak of live memory while ``fn()`` runs, above the level at entry, in bytes.

    ``fn`` is a full step (forward + backward).  ``device`` defaults to CUDA if
    available, else CPU.

    * CUDA: ``reset_peak_memory_stats`` then ``max_memory_allocated() -
      memory_allocated()`` measured at entry (caching-allocator bytes in use,
      not reserved).
    * CPU: ``torch.profiler`` with ``profile_memory=True`` records every
      allocation (+nbytes) and free (-nbytes) with a timestamp; the events are
      sorted by time and the maximum of the running sum is returned.  Frees of
      memory allocated *before* entry are not reported by the profiler (it
      does not know their size), so they cannot lower the running sum: the
      number is the peak of memory allocated during ``fn`` and still live,
      which is the peak above entry when ``fn`` frees nothing it did not
      allocate.  Allocations from all threads of the process are included.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(max(0, torch.cuda.max_memory_allocated(dev) - base))
    if dev.type != "cpu":
        raise NotImplementedError(f"peak_memory_bytes: unsupported device {dev}")

    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False
    ) as prof:
        fn()
    events = _cpu_memory_events(prof)
    events.sort(key=lambda e: e[0])
    running = 0
    peak = 0
    for _, nbytes in events:
        running += nbytes
        if running > peak:
            peak = running
    log.debug(
        "peak_memory_bytes(cpu): %d events, peak %d, net %d", len(events), peak, running
    )
    return int(peak)


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


def _param_name(name: str) -> str:
    # torch.compile wraps a module in OptimizedModule, which prefixes names
    # with "_orig_mod."; activation checkpointing wrappers may add
    # "_checkpoint_wrapped_module.".
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def grad_relative_error(ref: nn.Module, other: nn.Module) -> float:
    """``||g_other - g_ref|| / ||g_ref||`` over all parameters, in float64.

    Parameters are matched by name (wrapper prefixes such as ``_orig_mod.``
    removed).  Every parameter whose reference grad is not ``None`` takes
    part; a missing grad in ``other`` counts as zeros (so it shows up as
    error rather than being skipped).  A parameter of ``ref`` missing from
    ``other`` raises ``KeyError``.  Returns ``0.0`` if both are all zero and
    ``inf`` if only the reference is.
    """
    other_params = {_param_name(n): p for n, p in other.named_parameters()}
    diff_sq = 0.0
    ref_sq = 0.0
    n_used = 0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.grad is None:
                continue
            key = _param_name(name)
            if key not in other_params:
                raise KeyError(f"parameter {key!r} of ref not found in other")
            g_ref = p.grad.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            q = other_params[key]
            if q.grad is None:
                g_other = torch.zeros_like(g_ref)
            else:
                g_other = (
                    q.grad.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
                )
            if g_other.shape != g_ref.shape:
                raise ValueError(
                    f"grad shape mismatch for {key!r}: {tuple(g_other.shape)} "
                    f"vs {tuple(g_ref.shape)}"
                )
            diff_sq += float(torch.sum((g_other - g_ref) ** 2))
            ref_sq += float(torch.sum(g_ref**2))
            n_used += 1
    if n_used == 0:
        raise ValueError("grad_relative_error: ref has no parameter with a grad")
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq) / math.sqrt(ref_sq)


# --------------------------------------------------------------------------
# Step-time ratios
# --------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_step_ratios(
    steps: Mapping[str, Callable[[], None]],
    *,
    baseline: str,
    rounds: int,
    warmup: int = 1,
) -> dict[str, dict]:
    """Time already-compiled steps side by side and report ratios to ``baseline``.

    Each variant first runs ``warmup`` untimed steps.  Then, for each of
    ``rounds`` rounds, every variant runs one step, in an order rotated by one
    each round (so no variant always runs right after the same neighbour),
    timed with ``time.perf_counter`` (CUDA synchronised before and after when
    CUDA is in use).

    Returns, per variant::

        {"median_s": median step time,
         "ratio": median over rounds of t_variant / t_baseline (same round),
         "ratio_lo", "ratio_hi": the 95% bootstrap interval of that median
             (median_interval; NaN with fewer than two rounds),
         "times_s": [per-round times], "ratios": [per-round ratios],
         "error": None or "ExcType: message"}

    A variant that raises (during warm-up or a round) is dropped from the
    remaining rounds, reported with ``error`` set and NaN statistics; the
    others go on.  If the baseline fails, ratios are NaN.
    """
    if baseline not in steps:
        raise KeyError(f"baseline {baseline!r} not among steps {list(steps)}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(steps)
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}

    def _run(name: str) -> float | None:
        try:
            _sync()
            t0 = time.perf_counter()
            steps[name]()
            _sync()
            return time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a failing variant must not stop the others
            errors[name] = f"{type(e).__name__}: {e}"
            log.warning("interleaved_step_ratios: %s failed: %s", name, errors[name])
            return None

    for name in names:
        for _ in range(warmup):
            if name in errors or _run(name) is None:
                break

    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        this_round: dict[str, float] = {}
        for name in order:
            if name in errors:
                continue
            t = _run(name)
            if t is not None:
                this_round[name] = t
                times[name].append(t)
        tb = this_round.get(baseline)
        for name, t in this_round.items():
            if tb is not None and tb > 0:
                ratios[name].append(t / tb)

    out: dict[str, dict] = {}
    for name in names:
        ts = times[name]
        rs = ratios[name]
        failed = name in errors
        lo, hi = median_interval(rs) if not failed else (math.nan, math.nan)
        out[name] = {
            "median_s": statistics.median(ts) if ts and not failed else math.nan,
            "ratio": statistics.median(rs) if rs and not failed else math.nan,
            "ratio_lo": lo,
            "ratio_hi": hi,
            "times_s": ts,
            "ratios": rs,
            "error": errors.get(name),
        }
    return out


def median_interval(
    values: Iterable[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval of the median of ``values``.

    ``resamples`` resamples with replacement (a fixed ``seed``: the same data
    always gives the same interval); the interval is the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles of their medians. With 30 rounds of the
    4-layer benchmark Llama on a 2-core CPU, step-time ratios near 1.05-1.17
    had intervals 0.015-0.044 wide. ``(nan, nan)`` for fewer than two values:
    one round says nothing about its own spread.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"median_interval: level must be in (0, 1), got {level!r}")
    if resamples < 1:
        raise ValueError(f"median_interval: resamples must be >= 1, got {resamples!r}")
    xs = [float(v) for v in values]
    if len(xs) < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    n = len(xs)
    medians = sorted(statistics.median(rng.choices(xs, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    lo = medians[min(resamples - 1, int(math.floor(tail * resamples)))]
    hi = medians[min(resamples - 1, int(math.ceil((1.0 - tail) * resamples)) - 1)]
    return lo, hi
