"""Remembered smallest-peak plans, so that a stated smallest budget stays feasible.

An infeasible budget is reported with the smallest budget adacc found
feasible: the exact simulated peak of the smallest-peak plan the solver
returned. That search is a MILP bounded by a node count and a time limit, and
HiGHS does not always stop at the same plan (its search order depends on
timing). Compiling again at the stated budget could then meet a worse plan
and fail. So each graph's best smallest-peak plan is written to
``<cache_dir>/smallest_plans/<key>.json`` (by node names) and offered again
the next time that graph is compiled with the same planning options; the
backend checks it with the exact simulation like any other plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import torch.fx as fx

from adacc_compiler.config import AdaccConfig

log = logging.getLogger(__name__)

__all__ = ["plan_key", "recall", "remember"]

_FORMAT = 1
# The options a plan's validity depends on (the budget does not: the plan is
# the smallest-peak one whatever the budget).
_KEY_OPTIONS = ("compress", "min_sqnr_db", "compress_sensitive", "compress_checkpoints", "stochastic_rounding")


def plan_key(gm: fx.GraphModule, config: AdaccConfig) -> str:
    """A key for ``gm``'s graph and the options its plans depend on."""
    options = {name: getattr(config, name) for name in _KEY_OPTIONS}
    text = gm.code + json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _path(config: AdaccConfig, key: str) -> str | None:
    if not config.cache_dir:
        return None
    return os.path.join(config.cache_dir, "smallest_plans", f"{key}.json")


def recall(
    config: AdaccConfig, key: str, gm: fx.GraphModule, codecs_offered: dict[fx.Node, Any]
) -> tuple[int, dict[str, Any]] | None:
    """The remembered plan for ``key`` as ``(peak, {save, recompute, keep_primals, compress})``.

    ``None`` when there is none, or when it names a node the graph lacks or a
    codec no longer on that value's menu (its measured error may differ now).
    """
    path = _path(config, key)
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != _FORMAT:
            return None
        by_name = {n.name: n for n in gm.graph.nodes}
        save = {by_name[n] for n in raw["save"]}
        recompute = {by_name[n] for n in raw["recompute"]}
        keep = {by_name[n] for n in raw["keep_primals"]}
        compress = {by_name[n]: codec for n, codec in raw["compress"].items()}
        peak = int(raw["peak"])
    except KeyError:
        log.debug("remembered plan %s names nodes this graph lacks; ignored", path)
        return None
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable remembered plan %s: %s", path, e)
        return None
    for node, codec in compress.items():
        if codec not in {o.codec for o in codecs_offered.get(node, ())}:
            return None
    return peak, {"save": save, "recompute": recompute, "keep_primals": keep, "compress": compress}


def remember(config: AdaccConfig, key: str, peak: int, plan: Any) -> None:
    """Store ``plan`` (save / recompute / keep_primals / compress) for ``key`` if it beats the stored one."""
    path = _path(config, key)
    if path is None:
        return
    try:
        if os.path.exists(path):
            with open(path) as f:
                if int(json.load(f).get("peak", 1 << 62)) <= peak:
                    return
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # an unreadable file is replaced
    record = {
        "format": _FORMAT,
        "peak": int(peak),
        "save": sorted(n.name for n in plan.save),
        "recompute": sorted(n.name for n in plan.recompute),
        "keep_primals": sorted(n.name for n in plan.keep_primals),
        "compress": {n.name: codec for n, codec in sorted(plan.compress.items(), key=lambda kv: kv[0].name)},
    }
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".plan.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.warning("could not write remembered plan %s: %s", path, e)
