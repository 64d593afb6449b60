"""Remembered smallest-peak plans (adacc_compiler/smallest.py)."""

from __future__ import annotations

import types

import torch
import torch.fx as fx

from adacc_compiler import smallest
from adacc_compiler.config import AdaccConfig


def _graph() -> fx.GraphModule:
    def f(x, w):
        h = torch.relu(x @ w)
        return (h * h).sum()

    return fx.symbolic_trace(f)


def _plan(gm, *, save=(), recompute=(), keep=(), compress=None):
    by_name = {n.name: n for n in gm.graph.nodes}
    return types.SimpleNamespace(
        save={by_name[n] for n in save},
        recompute={by_name[n] for n in recompute},
        keep_primals={by_name[n] for n in keep},
        compress={by_name[n]: c for n, c in (compress or {}).items()},
    )


def test_remember_and_recall_by_node_names(tmp_path):
    config = AdaccConfig.from_options({"cache_dir": str(tmp_path)}, environ={})
    gm = _graph()
    key = smallest.plan_key(gm, config)
    assert smallest.recall(config, key, gm, {}) is None
    smallest.remember(config, key, 1000, _plan(gm, save=["matmul"], recompute=["relu"], keep=["x"]))
    peak, plan = smallest.recall(config, key, gm, {})
    assert peak == 1000
    assert {n.name for n in plan["save"]} == {"matmul"} and {n.name for n in plan["recompute"]} == {"relu"}
    assert {n.name for n in plan["keep_primals"]} == {"x"} and plan["compress"] == {}
    # A larger peak does not replace a smaller one; a smaller one does.
    smallest.remember(config, key, 2000, _plan(gm, save=["relu"]))
    assert smallest.recall(config, key, gm, {})[0] == 1000
    smallest.remember(config, key, 500, _plan(gm, save=["relu"]))
    assert smallest.recall(config, key, gm, {})[0] == 500


def test_recall_refuses_other_graphs_options_and_codecs(tmp_path):
    config = AdaccConfig.from_options({"cache_dir": str(tmp_path)}, environ={})
    gm = _graph()
    key = smallest.plan_key(gm, config)
    # Planning options are part of the key; the budget is not.
    other = AdaccConfig.from_options({"cache_dir": str(tmp_path), "compress": "off"}, environ={})
    assert smallest.plan_key(gm, other) != key
    same = AdaccConfig.from_options({"cache_dir": str(tmp_path), "memory_budget": 0.3}, environ={})
    assert smallest.plan_key(gm, same) == key
    smallest.remember(config, key, 100, _plan(gm, compress={"relu": "int8_token"}))
    # The codec must still be on the value's menu (its error is measured anew).
    assert smallest.recall(config, key, gm, {}) is None
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    offered = {relu: [types.SimpleNamespace(codec="int8_token")]}
    assert smallest.recall(config, key, gm, offered)[1]["compress"] == {relu: "int8_token"}
    # A graph without the named nodes gets nothing.
    assert smallest.recall(config, key, fx.symbolic_trace(lambda x: x + 1), offered) is None
