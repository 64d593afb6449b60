"""Tests of adacc_compiler.measure: the run-time measurements used by the benches."""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from torch import nn

from adacc_compiler.measure import (
    grad_relative_error,
    interleaved_step_ratios,
    peak_memory_bytes,
    saved_activation_bytes,
    storage_key,
)

F32 = 4  # bytes per float32 element
MiB = 1 << 20


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _saved_by_graph_walk(loss: torch.Tensor, exclude: list[torch.Tensor]) -> int:
    """Independent count: walk grad_fn nodes and read their ``_saved_*`` tensors."""
    excluded = {storage_key(t)[0] for t in exclude}
    storages: dict[int, int] = {}
    seen_nodes = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                val = getattr(node, attr)
            except RuntimeError:
                continue
            vals = val if isinstance(val, (tuple, list)) else (val,)
            for v in vals:
                if isinstance(v, torch.Tensor):
                    ptr, nbytes = storage_key(v)
                    if ptr not in excluded:
                        storages[ptr] = nbytes
        stack.extend(n for n, _ in node.next_functions)
    return sum(storages.values())


# --------------------------------------------------------------------------
# saved_activation_bytes
# --------------------------------------------------------------------------


def test_saved_bytes_mlp_by_hand():
    m = _mlp()
    x = torch.randn(4, 16)  # does not require grad
    params = list(m.parameters())
    got = saved_activation_bytes(lambda: m(x).sum(), exclude=params)
    # Linear1 (addmm): saves its input x (needed for W1's grad); W1 itself is not
    #   needed because x needs no grad.                          4*16 floats
    # ReLU: saves its output h.                                  4*32 floats
    # Linear2: saves h (for W2's grad: same storage, counted once) and W2^T
    #   (for h's grad: a view of a parameter, excluded).
    # sum: saves only sizes.
    assert got == (4 * 16 + 4 * 32) * F32


def test_saved_bytes_counts_params_unless_excluded():
    m = _mlp()
    x = torch.randn(4, 16)
    with_params = saved_activation_bytes(lambda: m(x).sum(), exclude=())
    without = saved_activation_bytes(lambda: m(x).sum(), exclude=list(m.parameters()))
    # The only parameter saved is W2 (32 x 8), through its transpose view.
    assert with_params - without == 32 * 8 * F32


def test_saved_bytes_excluding_input():
    m = _mlp()
    x = torch.randn(4, 16)
    got = saved_activation_bytes(lambda: m(x).sum(), exclude=[*m.parameters(), x])
    assert got == 4 * 32 * F32


def test_saved_bytes_matches_graph_walk():
    torch.manual_seed(0)
    lin = nn.Linear(8, 24)
    x = torch.randn(5, 8, requires_grad=True)
    params = list(lin.parameters())

    def fwd():
        h = lin(x)
        a = torch.tanh(h)
        b = torch.sigmoid(h) * a
        return (b.softmax(-1) * a).sum()

    got = saved_activation_bytes(fwd, exclude=params)
    expected = _saved_by_graph_walk(fwd(), params)
    assert expected > 0
    assert got == expected


def test_saved_bytes_hook_returns_tensor_unchanged():
    m = _mlp()
    x = torch.randn(4, 16)
    m.zero_grad()
    m(x).sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    loss_box = []

    def fwd():
        loss = m(x).sum()
        loss_box.append(loss)
        return loss

    saved_activation_bytes(fwd, exclude=list(m.parameters()))
    loss_box[0].backward()  # graph built under the hooks still differentiates
    for p, g in zip(m.parameters(), ref):
        torch.testing.assert_close(p.grad, g)


def test_saved_bytes_views_share_storage():
    x = torch.randn(64, requires_grad=True)
    base = x * 2  # not saved by anything below except through views

    def fwd():
        a = base[:32]
        b = base[32:]
        return (a * a).sum() + (b * b).sum()  # mul saves both operands (views)

    got = saved_activation_bytes(fwd, exclude=[x])
    assert got == 64 * F32  # one storage, counted once at full size


def test_saved_bytes_compiled_aot_eager():
    m = _mlp()
    x = torch.randn(4, 16)
    params = list(m.parameters())
    eager = saved_activation_bytes(lambda: m(x).sum(), exclude=params)
    cm = torch.compile(m, backend="aot_eager")
    compiled = saved_activation_bytes(lambda: cm(x).sum(), exclude=params)
    # AOTAutograd saves through ctx.save_for_backward: the hook sees it.
    assert compiled > 0
    assert compiled == eager


# --------------------------------------------------------------------------
# peak_memory_bytes
# --------------------------------------------------------------------------


def test_peak_sees_known_allocation():
    n = 4 * MiB

    def fn():
        a = torch.empty(n, dtype=torch.uint8)
        a.fill_(1)
        del a

    peak = peak_memory_bytes(fn, device="cpu")
    assert n <= peak < n + 256 * 1024


def test_peak_two_live_vs_sequential():
    n = 2 * MiB

    def together():
        a = torch.ones(n, dtype=torch.uint8)
        b = torch.ones(n, dtype=torch.uint8)
        del a, b

    def one_after_other():
        a = torch.ones(n, dtype=torch.uint8)
        del a
        b = torch.ones(n, dtype=torch.uint8)
        del b

    p2 = peak_memory_bytes(together, device="cpu")
    p1 = peak_memory_bytes(one_after_other, device="cpu")
    assert 2 * n <= p2 < 2 * n + 256 * 1024
    assert n <= p1 < n + 256 * 1024


def test_peak_ignores_preexisting_memory():
    keep = torch.ones(8 * MiB, dtype=torch.uint8)

    def fn():
        nonlocal keep
        keep = None  # frees memory allocated before entry
        a = torch.ones(MiB, dtype=torch.uint8)
        del a

    peak = peak_memory_bytes(fn, device="cpu")
    assert MiB <= peak < MiB + 256 * 1024


def test_peak_of_step_covers_saved_activations():
    m = _mlp()
    x = torch.randn(64, 16)
    saved = saved_activation_bytes(lambda: m(x).sum(), exclude=list(m.parameters()))

    def step():
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    assert peak_memory_bytes(step, device="cpu") >= saved


# --------------------------------------------------------------------------
# grad_relative_error
# --------------------------------------------------------------------------


def test_grad_rel_err_zero_for_identical():
    a, b = _mlp(), _mlp()
    x = torch.randn(4, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    assert grad_relative_error(a, b) == 0.0


def test_grad_rel_err_by_hand():
    a = nn.Linear(2, 1)
    b = nn.Linear(2, 1)
    a.weight.grad = torch.tensor([[3.0, 0.0]])
    a.bias.grad = torch.tensor([4.0])
    b.weight.grad = torch.tensor([[3.0, 1.0]])
    b.bias.grad = torch.tensor([4.0 - 2.0])
    # ||g_ref|| = 5, ||diff|| = sqrt(1 + 4)
    assert grad_relative_error(a, b) == pytest.approx(math.sqrt(5.0) / 5.0, rel=1e-12)


def test_grad_rel_err_through_compile_wrapper_and_missing_grad():
    a = _mlp()
    b = _mlp()
    x = torch.randn(4, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    wrapped = torch.compile(b, backend="eager")  # names get "_orig_mod." prefixes
    assert grad_relative_error(a, wrapped) == 0.0
    b[0].bias.grad = None  # a missing grad counts as zeros
    ref_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in a.parameters()))
    expected = float(a[0].bias.grad.double().norm()) / ref_norm
    assert grad_relative_error(a, wrapped) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------
# interleaved_step_ratios
# --------------------------------------------------------------------------


def test_interleaved_ratios_sleep():
    steps = {
        "base": lambda: time.sleep(0.004),
        "double": lambda: time.sleep(0.008),
        "same": lambda: time.sleep(0.004),
    }
    res = interleaved_step_ratios(steps, baseline="base", rounds=7, warmup=1)
    assert set(res) == set(steps)
    assert res["base"]["ratio"] == pytest.approx(1.0)
    assert 1.6 <= res["double"]["ratio"] <= 2.5
    assert 0.7 <= res["same"]["ratio"] <= 1.4
    assert 0.004 <= res["base"]["median_s"] < 0.05
    assert len(res["double"]["times_s"]) == 7
    assert all(r["error"] is None for r in res.values())


def test_interleaved_failing_variant_is_reported():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")
        time.sleep(0.001)

    steps = {"base": lambda: time.sleep(0.001), "flaky": flaky}
    res = interleaved_step_ratios(steps, baseline="base", rounds=4, warmup=1)
    assert res["flaky"]["error"] == "RuntimeError: boom"
    assert math.isnan(res["flaky"]["ratio"])
    assert res["base"]["error"] is None
    assert len(res["base"]["times_s"]) == 4


def test_interleaved_unknown_baseline():
    with pytest.raises(KeyError):
        interleaved_step_ratios({"a": lambda: None}, baseline="b", rounds=1)


@pytest.mark.parametrize("reentrant", [False, True])
def test_saved_bytes_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(16, 64, requires_grad=True)
    exclude = [*lin.parameters(), x]

    def region(h):
        return torch.tanh(lin(torch.relu(h)))

    plain = saved_activation_bytes(lambda: region(x * 2).sum(), exclude=exclude)
    ckpt = saved_activation_bytes(
        lambda: checkpoint(region, x * 2, use_reentrant=reentrant).sum(), exclude=exclude
    )
    # Plain: relu output (also the linear's input) and tanh output.
    assert plain == 2 * 16 * 64 * F32
    # Checkpointed: only the region's input x*2.
    assert ckpt == 16 * 64 * F32


# --------------------------------------------------------------------------
# median_interval
# --------------------------------------------------------------------------


def test_median_interval_brackets_the_median_and_narrows_with_more_rounds():
    import random as _random

    from adacc_compiler.measure import median_interval

    rng = _random.Random(1)
    few = [1.05 + rng.gauss(0, 0.02) for _ in range(10)]
    many = [1.05 + rng.gauss(0, 0.02) for _ in range(200)]
    lo, hi = median_interval(few)
    assert lo <= statistics.median(few) <= hi
    lo2, hi2 = median_interval(many)
    assert lo2 <= statistics.median(many) <= hi2
    assert hi2 - lo2 < hi - lo
    # 200 draws of sd 0.02: the median's standard error is about 0.0018, so a
    # 95% interval is roughly +-0.0035 and must hold the true median 1.05.
    assert 0.003 < hi2 - lo2 < 0.015
    assert lo2 < 1.05 < hi2
    # Deterministic for the same data.
    assert median_interval(many) == (lo2, hi2)


def test_median_interval_edge_cases():
    from adacc_compiler.measure import median_interval

    assert median_interval([1.2, 1.2, 1.2]) == (1.2, 1.2)
    assert all(math.isnan(v) for v in median_interval([1.0]))
    assert all(math.isnan(v) for v in median_interval([]))
    with pytest.raises(ValueError, match="level"):
        median_interval([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="resamples"):
        median_interval([1.0, 2.0], resamples=0)


def test_interleaved_ratios_report_an_interval_around_the_ratio():
    steps = {"base": lambda: time.sleep(0.002), "double": lambda: time.sleep(0.004)}
    res = interleaved_step_ratios(steps, baseline="base", rounds=6, warmup=1)
    r = res["double"]
    assert r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"]
    assert res["base"]["ratio_lo"] == res["base"]["ratio_hi"] == pytest.approx(1.0)
