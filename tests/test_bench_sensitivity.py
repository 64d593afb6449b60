"""``bench/bench_sensitivity.py``: what share of an activation's error reaches the gradients."""

from __future__ import annotations


import pytest

from tests import bench_scripts


@pytest.fixture(scope="module")
def rows():
    return bench_scripts.load("bench_sensitivity").measure("llama", 1, 40.0)


def test_a_linear_layers_input_disturbs_its_own_weight_gradient_undiluted(rows):
    # lm_head's weight gradient is X^T dY: the relative noise of X reaches it whole.
    (head_input,) = [r for r in rows if r["worst_param"] == "lm_head.weight" and r["shape"] == "512x256"]
    assert 0.5 < head_input["worst"] < 2.0
    # Spread over all the gradients, that error is diluted.
    assert head_input["global"] < 0.5 * head_input["worst"]


def test_parameters_and_small_tensors_are_not_measured(rows):
    assert rows, "no activation measured"
    assert all(r["numel"] >= 1024 for r in rows)
    assert all(r["global"] >= 0.0 and r["worst"] >= 0.0 for r in rows)
    # The weights autograd saves for the backward (transposed views) are not activations.
    assert not any(r["grad_fn"] == "TBackward0" for r in rows)
