"""Tests for adacc_compiler.costs: free ops, roofline, measurement, disk cache."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from adacc_compiler import costs
from adacc_compiler.costs import (
    DEVICE_SPECS,
    CostModel,
    draws_random,
    is_free,
    node_bytes,
    node_flops,
    roofline_seconds,
)

aten = torch.ops.aten


# A real op whose kernel raises while its fake implementation traces fine: the
# situation of a kernel that cannot run on the measuring device.
@torch.library.custom_op("adacc_test_costs::boom", mutates_args=())
def _boom(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("boom: this kernel cannot run here")


@_boom.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def trace(f, *inputs: torch.Tensor, mode: str = "fake") -> torch.fx.GraphModule:
    return make_fx(f, tracing_mode=mode)(*inputs)


def ops(gm: torch.fx.GraphModule, target=None) -> list[torch.fx.Node]:
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and (target is None or n.target == target)
    ]


def the(gm: torch.fx.GraphModule, target) -> torch.fx.Node:
    found = ops(gm, target)
    assert len(found) == 1, (target, found)
    return found[0]


# --------------------------------------------------------------------------- #
# Free nodes
# --------------------------------------------------------------------------- #


def test_views_and_getitem_cost_zero_and_are_not_measured(tmp_path):
    def f(x):
        y = x.view(8, 16).t().unsqueeze(0).expand(3, 16, 8)
        a, b = torch.split(x, 2)  # split + getitem
        s = x[1:3].select(1, 0).detach().permute(0)
        z = y.sum() + a.sum()  # two sums and an add that do cost
        return z, b, s

    gm = trace(f, torch.randn(4, 32))
    targets = {n.target for n in ops(gm)}
    for expected in (aten.view.default, aten.t.default, aten.expand.default, aten.split.Tensor):
        assert expected in targets

    cm = CostModel(profile=True, cache_dir=None)
    result = cm.node_costs(gm.graph.nodes)
    for node, cost in result.items():
        if node.target in (aten.sum.default, aten.add.Tensor):
            assert cost > 0, node
        else:
            assert cost == 0.0, node
            assert is_free(node)
    # Only the two reductions (of different shapes) and the add were run.
    assert cm.stats["measured"] == 3
    assert cm.stats["free"] == len(result) - 3


def test_copies_and_in_place_ops_are_not_free():
    def f(x):
        y = x.clone()
        y.add_(1)
        return torch.ops.aten._unsafe_view(y, [64]), x.t().contiguous()

    gm = trace(f, torch.randn(8, 8))
    assert not is_free(the(gm, aten.add_.Tensor))  # returns an alias, but writes it
    assert is_free(the(gm, aten._unsafe_view.default))
    # clone(), and contiguous() of a transposed tensor (recorded as a clone), copy.
    copying = ops(gm, aten.clone.default)
    assert len(copying) == 2 and not any(is_free(n) for n in copying)


def test_reshape_is_free_only_when_it_can_view():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    r = g.call_function(aten.reshape.default, (x, [64]))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        for val, free in ((torch.empty(8, 8), True), (torch.empty(8, 8).t(), False)):
            x.meta["val"] = val
            r.meta["val"] = torch.empty(64)
            assert is_free(r) is free


# --------------------------------------------------------------------------- #
# Roofline
# --------------------------------------------------------------------------- #


def test_matmul_flops_bytes_and_roofline():
    m, k, n = 48, 40, 24
    gm = trace(torch.mm, torch.randn(m, k), torch.randn(k, n))
    mm = the(gm, aten.mm.default)

    assert node_flops(mm) == 2 * m * n * k
    assert node_bytes(mm) == 4 * (m * k + k * n + m * n)
    cpu = DEVICE_SPECS["cpu"]
    expected = 2 * m * n * k / cpu.peak_flops(torch.float32) + node_bytes(mm) / cpu.bandwidth + cpu.overhead_s
    assert roofline_seconds(mm, device_kind="cpu") == pytest.approx(expected)
    assert expected == pytest.approx(2 * m * n * k / 1e11 + node_bytes(mm) / 2e10 + 5e-6)

    gm16 = trace(torch.mm, torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16))
    mm16 = the(gm16, aten.mm.default)
    assert roofline_seconds(mm16, device_kind="cuda") == pytest.approx(
        2 * m * n * k / 9.9e14 + 2 * (m * k + k * n + m * n) / 4.8e12 + 4e-6
    )
    # fp32 on cuda is an order of magnitude slower per FLOP than bf16.
    assert DEVICE_SPECS["cuda"].peak_flops(torch.float32) == 6.7e13

    with pytest.raises(ValueError, match="device_kind"):
        roofline_seconds(mm, device_kind="tpu")


def test_elementwise_has_no_flops_and_broadcast_inputs_read_once():
    gm = trace(lambda x, b: x + b, torch.randn(64, 32), torch.randn(32))
    add = the(gm, aten.add.Tensor)
    assert node_flops(add) == 0
    assert node_bytes(add) == 4 * (64 * 32 + 32) + 4 * 64 * 32

    gm = trace(lambda x, b: x + b.expand(64, 32), torch.randn(64, 32), torch.randn(32))
    add = the(gm, aten.add.Tensor)
    assert node_bytes(add) == 4 * (64 * 32 + 32) + 4 * 64 * 32  # the stride-0 input is 32 floats
    assert roofline_seconds(add, device_kind="cpu") == pytest.approx(node_bytes(add) / 2e10 + 5e-6)


def test_symbolic_shapes_use_hints():
    gm = trace(torch.mm, torch.randn(12, 10), torch.randn(10, 6), mode="symbolic")
    mm = the(gm, aten.mm.default)
    assert isinstance(mm.meta["val"].shape[0], torch.SymInt)
    assert node_flops(mm) == 2 * 12 * 10 * 6
    assert node_bytes(mm) == 4 * (12 * 10 + 10 * 6 + 12 * 6)

    cm = CostModel(profile=True, cache_dir=None)
    result = cm.node_costs(gm.graph.nodes)
    assert result[mm] > 0
    assert cm.stats["measured"] == 1 and cm.stats["measure_failed"] == 0
    # sym_size nodes are bookkeeping.
    assert all(v == 0 for n, v in result.items() if n is not mm)


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #


def test_large_matmul_measures_slower_than_tiny_add():
    def f(a, b, x, y):
        return a @ b, x + y

    gm = trace(f, torch.randn(384, 384), torch.randn(384, 384), torch.randn(4), torch.randn(4))
    cm = CostModel(profile=True, cache_dir=None)
    result = cm.node_costs(gm.graph.nodes)
    mm, add = the(gm, aten.mm.default), the(gm, aten.add.Tensor)
    assert cm.stats["measured"] == 2
    assert cm.stats["measure_seconds"] > 0
    # 113 MFLOP against 4 floats: orders of magnitude apart even on a busy machine.
    assert result[mm] > 5 * result[add] > 0


def test_identical_nodes_are_measured_once():
    def f(a, b, c, d):
        # Three adds of the same shapes (the repeated layers) and one of another.
        return a + b, b + c, c + a, d + d

    x = torch.randn(16, 16)
    gm = trace(f, x, x.clone(), x.clone(), torch.randn(8))
    adds = ops(gm, aten.add.Tensor)
    assert len(adds) == 4
    cm = CostModel(profile=True, cache_dir=None)
    result = cm.node_costs(adds)
    assert cm.stats["measured"] == 2
    assert cm.stats["cache_hits"] == 2
    assert result[adds[0]] == result[adds[1]] == result[adds[2]]
    # Costing again in the same process measures nothing new.
    cm.node_costs(adds)
    assert cm.stats["measured"] == 2 and cm.stats["cache_hits"] == 6


def test_index_ops_get_in_bounds_inputs():
    def f(weight, ids, src):
        return torch.embedding(weight, ids), torch.gather(src, 1, ids), src[ids[0]]

    gm = trace(
        f, torch.randn(1000, 16), torch.randint(0, 10, (4, 8)), torch.randn(4, 1000)
    )
    cm = CostModel(profile=True, cache_dir=None)
    result = cm.node_costs(ops(gm))
    assert cm.stats["measure_failed"] == 0
    for target in (aten.embedding.default, aten.gather.default, aten.index.Tensor):
        assert result[the(gm, target)] > 0


def test_op_that_raises_falls_back_to_roofline_and_is_counted(caplog):
    gm = trace(lambda x: torch.ops.adacc_test_costs.boom(x) * 2, torch.randn(32, 32))
    boom = the(gm, torch.ops.adacc_test_costs.boom.default)
    mul = the(gm, aten.mul.Tensor)

    cm = CostModel(profile=True, cache_dir=None)
    with caplog.at_level(logging.WARNING, logger="adacc_compiler.costs"):
        result = cm.node_costs([boom, mul])
    assert result[boom] == pytest.approx(roofline_seconds(boom, device_kind="cpu"))
    assert result[boom] > 0
    assert cm.stats["measure_failed"] == 1
    assert cm.stats["roofline"] == 1
    assert cm.stats["measured"] == 1  # the mul
    assert "adacc_test_costs.boom" in caplog.text


def test_failed_measurement_is_not_retried(monkeypatch):
    gm = trace(lambda x: x.exp(), torch.randn(8))
    exp = the(gm, aten.exp.default)
    calls = []

    def failing_time_call(fn, device):
        calls.append(device)
        raise RuntimeError("device lost")

    monkeypatch.setattr(costs, "_time_call", failing_time_call)
    cm = CostModel(profile=True, cache_dir=None)
    assert cm.node_cost(exp) == pytest.approx(roofline_seconds(exp, device_kind="cpu"))
    assert len(calls) == 1 and cm.stats["measure_failed"] == 1
    cm.node_cost(exp)
    assert len(calls) == 1 and cm.stats["measure_failed"] == 2


def test_profile_false_never_runs_ops(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("profile=False must not run ops")

    monkeypatch.setattr(costs, "_time_call", forbidden)
    monkeypatch.setattr(costs, "_build_args", forbidden)
    gm = trace(lambda a, b: (a @ b).relu().view(-1), torch.randn(16, 16), torch.randn(16, 16))
    cm = CostModel(profile=False, cache_dir=None)
    result = cm.node_costs(gm.graph.nodes)
    for node, cost in result.items():
        assert cost == pytest.approx(roofline_seconds(node, device_kind="cpu"))
    assert result[the(gm, aten.mm.default)] > result[the(gm, aten.relu.default)] > 0
    assert cm.stats["measured"] == 0 and cm.stats["measure_seconds"] == 0
    assert cm.stats["roofline"] == 2


def test_random_ops_get_roofline_and_leave_rng_alone():
    def f(x, q):
        y = torch.ops.aten.native_dropout(x, 0.5, True)[0]
        a = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True)[0]
        return y, a

    gm = trace(f, torch.randn(64), torch.randn(1, 2, 8, 4))
    dropout = the(gm, aten.native_dropout.default)
    sdpa = the(gm, aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert draws_random(dropout)
    assert not draws_random(sdpa)  # tagged seeded for its dropout, which is 0 here

    before = torch.get_rng_state()
    cm = CostModel(profile=True, cache_dir=None)
    result = cm.node_costs([dropout, sdpa])
    assert torch.equal(before, torch.get_rng_state())
    assert result[dropout] == pytest.approx(roofline_seconds(dropout, device_kind="cpu"))
    assert result[sdpa] > 0
    assert cm.stats["measured"] == 1 and cm.stats["roofline"] == 1


def test_measures_real_tensors_under_an_active_fake_mode():
    gm = trace(torch.mm, torch.randn(32, 32), torch.randn(32, 32))
    cm = CostModel(profile=True, cache_dir=None)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        result = cm.node_costs(ops(gm))
    assert cm.stats["measured"] == 1 and cm.stats["measure_failed"] == 0
    assert result[the(gm, aten.mm.default)] > 0


def test_measures_outside_the_python_dispatcher(monkeypatch):
    # The partitioner runs under AOTAutograd's Python dispatcher, which adds
    # a fixed cost to every eager op that compiled code never pays.
    from torch._dispatch.python import enable_python_dispatcher

    from adacc_compiler import costs as costs_mod

    key = torch._C.DispatchKey.PythonDispatcher
    seen = []
    timer = costs_mod._time_call

    def spy(fn, device):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_included(key))
        return timer(fn, device)

    monkeypatch.setattr(costs_mod, "_time_call", spy)
    gm = trace(torch.mm, torch.randn(32, 32), torch.randn(32, 32))
    cm = CostModel(profile=True, cache_dir=None)
    with enable_python_dispatcher():
        assert torch._C._dispatch_tls_is_dispatch_key_included(key)
        cm.node_costs(ops(gm))
        cm.codec_cost("int8_token", (64, 256), torch.float32, torch.device("cpu"), fused=True)
    assert seen == [False, False, False]


def test_prims_ops_are_timed_through_their_aten_counterparts(monkeypatch):
    """Eager prims run Python references that Inductor's code never pays for."""
    from adacc_compiler import costs as costs_mod

    prims = torch.ops.prims
    # The stand-ins compute what the prims ops compute.
    x = torch.randn(3, 5)
    convert = costs_mod._timed_callable(prims.convert_element_type.default)
    assert convert is not prims.convert_element_type.default
    out = convert(x, torch.bfloat16)
    assert torch.equal(out, prims.convert_element_type.default(x, torch.bfloat16)) and out.dtype == torch.bfloat16
    iota_kw = dict(start=3, step=2, dtype=torch.int64, device=torch.device("cpu"), requires_grad=False)
    iota = costs_mod._timed_callable(prims.iota.default)
    assert torch.equal(iota(7, **iota_kw), prims.iota.default(7, **iota_kw))
    assert costs_mod._timed_callable(torch.ops.aten.mul.Tensor) is torch.ops.aten.mul.Tensor

    # A traced prims node is measured through the stand-in.
    called = []

    def spy(a, dtype):
        called.append(dtype)
        return torch.ops.aten._to_copy.default(a, dtype=dtype)

    monkeypatch.setitem(costs_mod._ATEN_COUNTERPARTS, prims.convert_element_type.default, spy)
    gm = trace(lambda t: prims.convert_element_type.default(t, torch.float64), torch.randn(8, 8))
    node = the(gm, prims.convert_element_type.default)
    cost = CostModel(profile=True, cache_dir=None).node_costs([node])[node]
    assert cost > 0 and called and set(called) == {torch.float64}


# --------------------------------------------------------------------------- #
# Disk cache
# --------------------------------------------------------------------------- #


def _mlp_graph() -> torch.fx.GraphModule:
    def f(x, w1, w2):
        return (torch.relu(x @ w1) @ w2).sum()

    return trace(f, torch.randn(32, 64), torch.randn(64, 128), torch.randn(128, 16))


def test_disk_cache_round_trips(tmp_path):
    cache = tmp_path / "nested" / "cache"
    gm = _mlp_graph()
    first = CostModel(profile=True, cache_dir=str(cache))
    costs1 = first.node_costs(gm.graph.nodes)
    n_costed = sum(1 for n in gm.graph.nodes if not is_free(n))
    assert first.stats["measured"] == n_costed == 4  # mm, relu, mm, sum
    files = os.listdir(cache)
    assert files == ["op_costs.json"]  # no temp file left behind
    entries = json.loads((cache / "op_costs.json").read_text())["entries"]
    assert len(entries) == 4
    assert any("aten.mm.default" in k and torch.__version__ in k for k in entries)

    # A fresh model on the same directory (a new process) measures nothing.
    second = CostModel(profile=True, cache_dir=str(cache))
    costs2 = second.node_costs(_mlp_graph().graph.nodes)
    assert second.stats["measured"] == 0
    assert second.stats["cache_hits"] == 4
    assert second.stats["measure_seconds"] == 0
    assert sorted(costs2.values()) == sorted(costs1.values())


def test_cache_keys_separate_shapes_and_writers_merge(tmp_path):
    # Two models loaded before either wrote: like two processes sharing a cache.
    a = CostModel(profile=True, cache_dir=str(tmp_path))
    b = CostModel(profile=True, cache_dir=str(tmp_path))
    a.node_costs(ops(trace(torch.mm, torch.randn(8, 8), torch.randn(8, 8))))
    b.node_costs(ops(trace(torch.mm, torch.randn(8, 16), torch.randn(16, 8))))
    assert b.stats["measured"] == 1 and b.stats["cache_hits"] == 0
    entries = json.loads((tmp_path / "op_costs.json").read_text())["entries"]
    assert len(entries) == 2  # b's write kept a's entry


def test_corrupt_cache_is_ignored(tmp_path, caplog):
    (tmp_path / "op_costs.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="adacc_compiler.costs"):
        cm = CostModel(profile=True, cache_dir=str(tmp_path))
    assert "unreadable" in caplog.text
    cm.node_costs(ops(trace(torch.mm, torch.randn(8, 8), torch.randn(8, 8))))
    assert cm.stats["measured"] == 1
    assert len(json.loads((tmp_path / "op_costs.json").read_text())["entries"]) == 1


# --------------------------------------------------------------------------- #
# Joint graphs and input validation
# --------------------------------------------------------------------------- #


def test_aot_joint_graph_forward_nodes():
    from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition

    captured: dict[str, torch.fx.GraphModule] = {}

    def partition(joint, joint_inputs, **kwargs):
        captured["joint"] = joint
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    def f(x, w1, w2, g):
        h = torch.nn.functional.silu(x @ w1)
        h = torch.nn.functional.layer_norm(h, (h.shape[-1],), g)
        return (h @ w2).sum()

    compiled = aot_function(f, fw_compiler=lambda gm, _: make_boxed_func(gm), partition_fn=partition)
    inputs = [torch.randn(16, 32, requires_grad=True), torch.randn(32, 64, requires_grad=True),
              torch.randn(64, 32, requires_grad=True), torch.randn(64, requires_grad=True)]
    compiled(*inputs).backward()
    joint = captured["joint"]

    tangents = {n for n in joint.graph.nodes if n.op == "placeholder" and "tangent" in n.name}
    backward: set[torch.fx.Node] = set(tangents)
    for n in joint.graph.nodes:
        if any(a in backward for a in n.all_input_nodes):
            backward.add(n)
    forward = [n for n in joint.graph.nodes if n not in backward and n.op != "output"]

    cm = CostModel(profile=True, cache_dir=None)
    result = cm.node_costs(forward)
    assert set(result) == set(forward)
    assert cm.stats["measure_failed"] == 0
    assert all(result[n] > 0 for n in forward if n.target == aten.mm.default)
    assert all(result[n] == 0 for n in forward if n.op == "placeholder")


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        CostModel(profile="yes", cache_dir=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        CostModel(profile=True, cache_dir=None, device="not-a-device")
    with pytest.raises(ValueError, match="device"):
        CostModel(profile=False, cache_dir=None, device="meta")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="cache_dir"):
        CostModel(profile=True, cache_dir=str(a_file))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            CostModel(profile=True, cache_dir=None, device="cuda")
        # The roofline needs no device.
        CostModel(profile=False, cache_dir=None, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measurement():
    gm = trace(torch.mm, torch.randn(1024, 1024, device="cuda"), torch.randn(1024, 1024, device="cuda"))
    cm = CostModel(profile=True, cache_dir=None)
    mm = the(gm, aten.mm.default)
    cost = cm.node_cost(mm)
    assert cm.stats["measured"] == 1 and cm.stats["measure_failed"] == 0
    # 2 GFLOP in fp32 (TF32 off by default): between 1 us and 100 ms on any GPU.
    assert 1e-6 < cost < 0.1


def test_codec_costs_time_the_path_the_rewrite_emits(tmp_path):
    # On the CPU the rewrite inlines the fusible codecs for Inductor: their
    # cost is timed as Inductor-compiled encode and decode kernels; the others
    # as the codec's ops. Each side is cached under its own key.
    cm = CostModel(profile=True, cache_dir=str(tmp_path))
    shape, cpu = (64, 256), torch.device("cpu")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fused = cm.codec_cost("int8_token", shape, torch.float32, cpu, fused=True)
    # Compiled by Inductor directly: no Dynamo frame, whose guard checks
    # would be timed with every call.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    ops = cm.codec_cost("int8_token", shape, torch.float32, cpu)
    assert fused > 0 and ops > 0
    assert cm.stats["measured"] == 4
    again = CostModel(profile=True, cache_dir=str(tmp_path))
    assert again.codec_cost("int8_token", shape, torch.float32, cpu, fused=True) == fused
    assert again.codec_cost("int8_token", shape, torch.float32, cpu) == ops
    assert again.stats["measured"] == 0 and again.stats["cache_hits"] == 4
    # Without profiling both are the same roofline.
    roof = CostModel(profile=False, cache_dir=None)
    assert roof.codec_cost("int8_token", shape, torch.float32, cpu, fused=True) == roof.codec_cost(
        "int8_token", shape, torch.float32, cpu
    )


def test_a_codec_side_that_joins_a_kernel_costs_what_it_adds(tmp_path):
    from adacc_compiler.triton_kernels import get_codec

    shape, cpu = (64, 256), torch.device("cpu")
    payload = get_codec("int8_token").compressed_nbytes(shape, torch.float32)
    floor = payload / costs.DEVICE_SPECS["cpu"].bandwidth
    # Roofline: a joining side moves only the payload, a standalone one the
    # tensor as well, plus a launch.
    roof = CostModel(profile=False, cache_dir=None)
    alone = roof.codec_cost("int8_token", shape, torch.float32, cpu, fused=True)
    joined = roof.codec_cost("int8_token", shape, torch.float32, cpu, fused=True, encode_joins=True, decode_joins=True)
    assert joined == pytest.approx(2 * floor)
    half = roof.codec_cost("int8_token", shape, torch.float32, cpu, fused=True, decode_joins=True)
    assert joined < half < alone
    # Measured: a difference of two kernels' times, never below the floor.
    cm = CostModel(profile=True, cache_dir=str(tmp_path))
    measured = cm.codec_cost("int8_token", shape, torch.float32, cpu, fused=True, encode_joins=True, decode_joins=True)
    assert measured >= 2 * floor
    assert cm.stats["measured"] == 2
    with pytest.raises(ValueError, match="encode_joins and decode_joins need fused=True"):
        cm.codec_cost("int8_token", shape, torch.float32, cpu, encode_joins=True)


def test_inductor_compiled_runs_the_generated_code_on_its_arguments():
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    single = costs._inductor_compiled(lambda a, b: a * b + 1.0, x, y)
    torch.testing.assert_close(single(y, x), y * x + 1.0)
    pair = costs._inductor_compiled(lambda a, b: (a + b, a.amax(dim=1)), x, y)
    s, m = pair(x, y)
    torch.testing.assert_close(s, x + y)
    torch.testing.assert_close(m, x.amax(dim=1))
    # Compiled inside another compile's tracing context (as when adacc's
    # partitioner measures), it still takes real tensors.
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    with tracing(TracingContext(FakeTensorMode())):
        inner = costs._inductor_compiled(lambda a: a.sin(), x)
    torch.testing.assert_close(inner(x), x.sin())


def test_fused_recompute_drops_the_ops_own_traffic():
    # 4M float32 elements: exp reads and writes 32 MiB, 1.68 ms at the CPU constant.
    gm = trace(torch.exp, torch.randn(1024, 4096))
    (node,) = ops(gm, torch.ops.aten.exp.default)
    traffic = costs.node_bytes(node) / costs.DEVICE_SPECS["cpu"].bandwidth
    assert traffic == pytest.approx(2 * 4 * 1024 * 4096 / 2e10)
    # Mostly traffic: what is left over is charged.
    assert costs.fused_recompute_seconds(node, traffic + 1e-3, device_kind="cpu") == pytest.approx(1e-3)
    # All traffic (or less than the rough constants predict): a tenth of the measurement.
    assert costs.fused_recompute_seconds(node, traffic, device_kind="cpu") == pytest.approx(0.1 * traffic)
    assert costs.fused_recompute_seconds(node, 1e-6, device_kind="cuda") == pytest.approx(1e-7)


def test_recompute_costs_discount_only_values_that_fuse():
    # exp feeds a pointwise mul (fuses when recomputed); the mm's output feeds
    # the exp but is a matmul, which never fuses.
    gm = trace(lambda a, b: torch.exp(a @ b) * 2.0, torch.randn(64, 256), torch.randn(256, 64))
    (exp,) = ops(gm, torch.ops.aten.exp.default)
    (mm,) = ops(gm, torch.ops.aten.mm.default)
    cm = costs.CostModel(profile=False, cache_dir=None)
    plain = cm.node_costs([exp, mm])
    rec = cm.recompute_costs([exp, mm])
    assert rec[mm] == plain[mm]
    assert rec[exp] == pytest.approx(costs.fused_recompute_seconds(exp, plain[exp], device_kind="cpu"))
    assert rec[exp] < plain[exp]


def _mask_then_scores(scores, mask):
    # A float mask built from a bool and read by scores over every head.
    m = torch.where(mask, 0.0, -1e9)
    return scores * 0.125 + m, scores.sum(-1, keepdim=True) + m


def test_bool_inputs_and_inlined_elements_count_the_readers_kernels():
    gm = trace(_mask_then_scores, torch.randn(2, 4, 8, 8), torch.rand(2, 1, 8, 8) > 0.5)
    where = the(gm, aten.where.self)
    # Two readers: the (2, 4, 8, 8) scores and the (2, 4, 8, 8) broadcast sum.
    assert costs.bool_inputs_and_inlined_elements(where) == (1, 2 * 2 * 4 * 8 * 8)
    (mul,) = ops(gm, aten.mul.Tensor)
    assert costs.bool_inputs_and_inlined_elements(mul)[0] == 0


def test_a_fused_value_reading_a_bool_is_charged_per_inlined_element(monkeypatch):
    gm = trace(_mask_then_scores, torch.randn(2, 4, 8, 8), torch.rand(2, 1, 8, 8) > 0.5)
    where = the(gm, aten.where.self)
    (mul,) = ops(gm, aten.mul.Tensor)
    cm = CostModel(profile=False, cache_dir=None)
    monkeypatch.setattr(CostModel, "bool_read_seconds", lambda self, device: 1e-9)
    plain = cm.node_costs([where, mul])
    rec = cm.recompute_costs([where, mul])
    fused_where = costs.fused_recompute_seconds(where, plain[where], device_kind="cpu")
    # Computed at each of its two readers' 512 elements: 1024 evaluations of a 128-element value.
    assert costs.inlined_evaluations(where) == 2 * 512
    assert rec[where] == pytest.approx(fused_where * 1024 / 128 + 2 * 2 * 4 * 8 * 8 * 1e-9)
    assert rec[mul] == pytest.approx(costs.fused_recompute_seconds(mul, plain[mul], device_kind="cpu"))


def _rotary_layers(q1, q2, k1, inv_freq, pos):
    # A rotary table (8 x 4) built once and read by two "layers'" rotations of
    # (2, 3, 8, 4) queries and a (2, 1, 8, 4) key, as in a Llama.
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * 1.0
    c = cos[None, None]
    return q1 * c + 1.0, k1 * c, (q2 * c).sum(-1)


def test_inlined_evaluations_count_every_kernel_a_broadcast_table_lands_in():
    args = (torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4), torch.randn(2, 1, 8, 4), torch.randn(2), torch.arange(8.0))
    gm = trace(_rotary_layers, *args)
    cos = the(gm, aten.cos.default)
    (scale,) = [n for n in ops(gm, aten.mul.Tensor) if n.args[0] is cos]
    # The scaled table (32 values) is read, through views, by the 192-element
    # query rotation (whose same-shape add lands in its kernel), the 64-element
    # key rotation and the 192-element product a reduction reads: it is
    # computed at every element of each.
    assert costs.inlined_evaluations(scale) == 192 + 64 + 192
    # cos is inlined into the scaling, so it is evaluated wherever that is.
    assert costs.inlined_evaluations(cos) == 192 + 64 + 192
    # A value read only at its own shape is evaluated once per element.
    (add,) = ops(gm, aten.add.Tensor)
    (q_rot,) = add.all_input_nodes
    assert costs.inlined_evaluations(q_rot) == 192


def test_recompute_costs_charge_a_broadcast_table_per_inlined_element():
    args = (torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4), torch.randn(2, 1, 8, 4), torch.randn(2), torch.arange(8.0))
    gm = trace(_rotary_layers, *args)
    cos = the(gm, aten.cos.default)
    cm = CostModel(profile=False, cache_dir=None)
    plain = cm.node_costs([cos])
    rec = cm.recompute_costs([cos])
    fused = costs.fused_recompute_seconds(cos, plain[cos], device_kind="cpu")
    assert rec[cos] == pytest.approx(fused * (192 + 64 + 192) / 32)


def test_bool_read_seconds_is_measured_once_and_cached(tmp_path):
    assert CostModel(profile=False, cache_dir=None).bool_read_seconds(torch.device("cpu")) == 0.0
    cm = CostModel(profile=True, cache_dir=tmp_path)
    first = cm.bool_read_seconds(torch.device("cpu"))
    assert first >= 0.0
    assert cm.stats["measured"] == 1
    # A second model on the same cache reads it back instead of timing again.
    again = CostModel(profile=True, cache_dir=tmp_path)
    assert again.bool_read_seconds(torch.device("cpu")) == first
    assert again.stats["measured"] == 0


def test_a_transient_slow_call_does_not_become_the_cost():
    # Calls 2-3 (right after the warm-up) are slowed, as when another process
    # holds a core for a time slice; the op itself is fast. Sizing the rounds
    # on one slow call used to time the op in a single, equally slow round.
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] in (2, 3):
            time.sleep(0.03)

    assert costs._time_call(fn, torch.device("cpu")) < 0.005


def test_compile_workers_are_up_before_timing(monkeypatch):
    from torch._inductor.async_compile import AsyncCompile

    waited = []
    monkeypatch.setattr(costs, "_workers_waited", False)
    monkeypatch.setattr(AsyncCompile, "warm_pool", classmethod(lambda cls: waited.append("warm")))
    monkeypatch.setattr(AsyncCompile, "wait_pool_ready", classmethod(lambda cls, timeout=120: waited.append("ready")))
    cm = CostModel(profile=True, cache_dir=None)
    cm.codec_cost("int8_token", (8, 64), torch.float32, torch.device("cpu"))
    assert waited == ["warm", "ready"]
    cm.codec_cost("int8_token", (8, 128), torch.float32, torch.device("cpu"))
    assert waited == ["warm", "ready"]  # once per process


def test_a_codec_timing_is_not_reused_once_the_codec_changes(tmp_path, monkeypatch):
    shape, cpu = (8, 64), torch.device("cpu")
    first = CostModel(profile=True, cache_dir=str(tmp_path))
    first.codec_cost("int8_token", shape, torch.float32, cpu)
    assert first.stats["measured"] == 2
    # The same codec, its definition edited: the cached timing is stale.
    monkeypatch.setattr(costs, "_codec_source_tag", lambda codec: "src edited")
    again = CostModel(profile=True, cache_dir=str(tmp_path))
    again.codec_cost("int8_token", shape, torch.float32, cpu)
    assert again.stats["measured"] == 2 and again.stats["cache_hits"] == 0
