#!/usr/bin/env python
"""How much of an activation's error reaches the parameter gradients.

    python bench/bench_sensitivity.py --model llama --layers 4 --out bench/results/sensitivity_llama4.csv

adacc's plan bound (``min_plan_sqnr_db``) sums the relative noise power of
every value a plan compresses lossily, as if each value's error reached the
gradients whole. This measures what does reach them. One eager step of the
model records every activation autograd saves for the backward; then, one at
a time, each (float, at least 1024 elements, not a parameter) is replaced in
the backward by itself plus Gaussian noise of relative power ``n0`` (default
``--noise-db 40``: small enough that gradients respond linearly), and the
step's parameter gradients are compared with the exact ones. Per activation:

``global``  the noise power in all gradients together, relative to their
            power, divided by ``n0``: 1 means the activation's relative error
            reaches the gradients undiluted
``worst``   the same for the single parameter whose gradient it disturbs
            most (relative to that gradient's own power), and its name

The activations are eager autograd's saved tensors, not adacc's joint-graph
values, but the same quantities: matmul inputs, SiLU and softmax outputs,
the residual stream read by RMSNorm's backward, RoPE's tables.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adacc_compiler.models import MODELS, loss_of, make_model  # noqa: E402

FIELDS = ["index", "grad_fn", "shape", "numel", "global", "worst", "worst_param"]
MIN_NUMEL = 1024


def _step_grads(model, batch, params, *, perturb: int | None = None, n0: float = 0.0, record: list | None = None):
    """Parameter gradients of one step; saved tensor number ``perturb`` noised for the backward."""
    for p in params.values():
        p.grad = None
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        i, count = count, count + 1
        if record is not None:
            is_param = t.untyped_storage().data_ptr() in storages
            name = type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf"
            record.append((i, name, tuple(t.shape), t.numel(), t.is_floating_point() and not is_param))
        if i == perturb:
            gen = torch.Generator(device=t.device).manual_seed(1234)
            rms = t.detach().float().pow(2).mean().sqrt()
            noise = torch.randn(t.shape, generator=gen, device=t.device) * (math.sqrt(n0) * rms)
            return t + noise.to(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model(**batch))
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in params.items()}


def measure(model_name: str, layers: int, noise_db: float) -> list[dict]:
    torch.manual_seed(0)
    model, batch = make_model(model_name, layers)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved: list = []
    exact = _step_grads(model, batch, params, record=saved)
    power = {n: g.pow(2).sum().item() for n, g in exact.items()}
    total = sum(power.values())
    n0 = 10 ** (-noise_db / 10)
    rows = []
    for index, grad_fn, shape, numel, candidate in saved:
        if not candidate or numel < MIN_NUMEL:
            continue
        noisy = _step_grads(model, batch, params, perturb=index, n0=n0)
        err = {n: (noisy[n] - exact[n]).pow(2).sum().item() for n in params}
        share = {n: err[n] / power[n] for n in params if power[n] > 0}
        worst = max(share, key=share.get)
        rows.append(
            {
                "index": index,
                "grad_fn": grad_fn,
                "shape": "x".join(map(str, shape)),
                "numel": numel,
                "global": sum(err.values()) / total / n0,
                "worst": share[worst] / n0,
                "worst_param": worst,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--noise-db", type=float, default=40.0, help="SQNR of the noise put on each activation")
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: print only)")
    args = p.parse_args(argv)
    if args.noise_db <= 0:
        raise ValueError(f"--noise-db: must be positive (an SQNR in dB), got {args.noise_db}")
    rows = measure(args.model, args.layers, args.noise_db)
    if args.out is not None:
        os.makedirs(args.out.parent, exist_ok=True)
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["grad_fn"], []).append(r)
    print(f"{args.model}, {args.layers} layers: {len(rows)} activations, noise at {args.noise_db:g} dB")
    print(f"{'saved for':28s} {'count':>5s} {'global (median, max)':>24s} {'worst param (median, max)':>28s}")
    for kind, rs in sorted(by_kind.items()):
        g = [r["global"] for r in rs]
        w = [r["worst"] for r in rs]
        print(
            f"{kind:28s} {len(rs):5d} {statistics.median(g):11.2e} {max(g):11.2e}  "
            f"{statistics.median(w):13.2e} {max(w):13.2e}"
        )
    # The plan bound counts each compressed value's relative noise once, in
    # full: all of them together as len(rows).
    print(
        f"all {len(rows)} activations noised together would put {sum(r['global'] for r in rows):.3f} x n0 "
        f"into the gradients, to first order (the plan bound counts {len(rows)} x n0)"
    )
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
