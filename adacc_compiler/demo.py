"""The main job: train a small GPT on real text with adacc under a memory budget.

``python -m adacc_compiler.demo`` trains a byte-level GPT on the Python
standard library's own source (present in every Python install, so nothing is
downloaded), compiled with ``backend="adacc"`` at ``--budget`` (default 0.5),
next to the same model on stock Inductor, step for step on the same batches.
At the end it prints both loss curves' last values, what each saves for the
backward (measured), adacc's plan summary, and the step-time ratio (median of
interleaved steps).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import sysconfig
import time

import torch

__all__ = ["main", "stdlib_corpus"]


def stdlib_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's ``.py`` files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()
    if not chunks:
        raise RuntimeError(f"no Python source found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adacc_compiler.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5, help="adacc memory_budget (fraction), default 0.5")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from adacc_compiler import compiled_graphs
    from adacc_compiler.measure import saved_activation_bytes
    from adacc_compiler.models import GPT

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("adacc_compiler").setLevel(logging.INFO)
    torch.manual_seed(args.seed)
    data = stdlib_corpus()
    print(f"corpus: {len(data):,} bytes of the Python standard library's source")
    base = GPT(vocab=256, dim=args.dim, heads=4, layers=args.layers, seq=args.seq)
    models = {"inductor": copy.deepcopy(base), "adacc": copy.deepcopy(base)}
    compiled = {
        "inductor": torch.compile(models["inductor"], backend="inductor"),
        "adacc": torch.compile(models["adacc"], backend="adacc", options={"memory_budget": args.budget}),
    }
    optims = {k: torch.optim.AdamW(m.parameters(), lr=3e-3) for k, m in models.items()}
    gen = torch.Generator().manual_seed(args.seed)

    def batch() -> torch.Tensor:
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        return torch.stack([data[s : s + args.seq] for s in starts.tolist()])

    losses: dict[str, list[float]] = {k: [] for k in models}
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(args.steps):
        idx = batch()
        order = list(models) if step % 2 == 0 else list(reversed(list(models)))
        for name in order:
            t0 = time.perf_counter()
            loss = compiled[name](idx)
            loss.backward()
            loss = loss.detach()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss inductor {losses['inductor'][-1]:.4f}  adacc {losses['adacc'][-1]:.4f}")

    idx = batch()
    saved = {
        name: saved_activation_bytes(lambda n=name: compiled[n](idx), exclude=list(models[name].parameters()))
        for name in models
    }
    # Step 0 holds the compile; the ratio is the median of per-step ratios after it.
    ratios = sorted(a / b for a, b in zip(times["adacc"][2:], times["inductor"][2:]))
    ratio = ratios[len(ratios) // 2] if ratios else float("nan")
    plan = compiled_graphs()[-1].plan
    print()
    print(f"{'':10s} {'final loss':>10s} {'saved MiB':>10s}")
    for name in models:
        print(f"{name:10s} {losses[name][-1]:10.4f} {saved[name] / 2**20:10.2f}")
    counts = plan.counts()
    print(
        f"\nadacc plan {plan.graph_id}: budget {plan.budget_bytes / 2**20:.2f} MiB "
        f"(stock peak {plan.stock_peak_bytes / 2**20:.2f} MiB), predicted peak {plan.predicted_peak_bytes / 2**20:.2f} MiB; "
        f"retain {counts['retain']}, recompute {counts['recompute']}; solver {plan.solver.status} in {plan.solver.time_s:.2f} s"
    )
    print(f"step-time ratio adacc / inductor (median of {len(ratios)} interleaved steps): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
