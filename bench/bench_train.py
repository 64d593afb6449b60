#!/usr/bin/env python
"""Training accuracy under a budget: ``adacc train`` over several seeds.

    python bench/bench_train.py --budget 0.25 --steps 300 --seeds 0 1 2 3 \
        --option compress_sensitive=true --option min_sqnr_db=30 \
        --out bench/results/train_b025

runs :func:`adacc_compiler.train.run_train` once per seed (each run trains the
same model on the same batches twice, step for step: stock Inductor and adacc
at the budget) and writes to ``--out``:

``seeds.csv``   per seed: final and held-out loss of both runs, their relative
                difference, saved and peak memory, step ratio
``seeds.png``   both loss curves of every seed (smoothed) and the held-out
                losses
``seed_<n>/``   each run's own outputs (``summary.json``, ``losses.csv``, plots;
                the dumps are dropped to keep the results small)

and prints the table with the mean and spread of the differences.
``--replot DIR`` draws ``DIR/seeds.png`` again from the ``losses.csv`` and
``config.json`` a run left there, without training. Run a
lossless control too (``--budget 1.0 --compress off``: the two runs differ
only in rounding): it shows how far apart the recipe itself lets two runs
end. At a peak learning rate of 2e-3 that was up to 2.5% in held-out loss,
more than the effect being measured; at the default 1e-3 it is within 0.02%.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from adacc_compiler.cli import _parse_options  # noqa: E402
from adacc_compiler.train import TrainConfig, TrainResult, _smooth, run_train  # noqa: E402

FIELDS = [
    "seed",
    "inductor_final_loss",
    "adacc_final_loss",
    "final_rel_diff",
    "inductor_heldout_loss",
    "adacc_heldout_loss",
    "heldout_rel_diff",
    "inductor_saved_mib",
    "adacc_saved_mib",
    "inductor_peak_mib",
    "adacc_peak_mib",
    "step_ratio",
    "replans",
]


def _row(seed: int, result: TrainResult) -> dict[str, float]:
    ind, ada = result.runs["inductor"], result.runs["adacc"]
    mib = 2**20
    return {
        "seed": seed,
        "inductor_final_loss": ind.final_loss,
        "adacc_final_loss": ada.final_loss,
        "final_rel_diff": ada.final_loss / ind.final_loss - 1,
        "inductor_heldout_loss": ind.eval_loss,
        "adacc_heldout_loss": ada.eval_loss,
        "heldout_rel_diff": ada.eval_loss / ind.eval_loss - 1,
        "inductor_saved_mib": ind.saved_bytes / mib,
        "adacc_saved_mib": ada.saved_bytes / mib,
        "inductor_peak_mib": ind.peak_bytes / mib,
        "adacc_peak_mib": ada.peak_bytes / mib,
        "step_ratio": result.step_ratio,
        # Plans made again after their codecs drifted (policy evolution).
        "replans": sum(1 for g in result.plan["graphs"] if g.get("replaces")),
    }


def _table(rows: list[dict[str, float]]) -> str:
    lines = [
        f"{'seed':>4} {'final (Ind / adacc)':>21} {'diff':>7} {'held-out (Ind / adacc)':>23} {'diff':>7} "
        f"{'saved MiB (Ind / adacc)':>24} {'step ratio':>10} {'re-plans':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['seed']:>4} {r['inductor_final_loss']:>10.4f} / {r['adacc_final_loss']:<8.4f} "
            f"{100 * r['final_rel_diff']:>+6.2f}% {r['inductor_heldout_loss']:>11.4f} / {r['adacc_heldout_loss']:<9.4f} "
            f"{100 * r['heldout_rel_diff']:>+6.2f}% {r['inductor_saved_mib']:>12.2f} / {r['adacc_saved_mib']:<9.2f} "
            f"{r['step_ratio']:>10.3f} {r['replans']:>8d}"
        )
    for key, label in (("final_rel_diff", "final loss"), ("heldout_rel_diff", "held-out loss")):
        values = [r[key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(
            f"{label}: adacc vs Inductor mean {100 * statistics.fmean(values):+.2f}%, "
            f"std {100 * spread:.2f}%, range {100 * min(values):+.2f}% .. {100 * max(values):+.2f}% "
            f"over {len(values)} seed(s)"
        )
    return "\n".join(lines)


def _title(budget: float, options: dict, compress: str | None = None) -> str:
    named = {**({"compress": compress} if compress is not None else {}), **options}
    opts = ", ".join(f"{k}={v}" for k, v in named.items())
    return f"adacc at budget {budget} ({opts or 'default options'}) vs stock Inductor"


def _plot(path: Path, losses: dict[int, dict[str, list[float]]], title: str) -> None:
    """Both runs' training losses of every seed: ``losses[seed]["inductor" | "adacc"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (seed, runs) in enumerate(losses.items()):
        color = colors[i % len(colors)]
        for name, style in (("inductor", ":"), ("adacc", "-")):
            label = f"seed {seed}, {'stock Inductor' if name == 'inductor' else 'adacc'}"
            ax.plot(_smooth(runs[name], 15), style, color=color, linewidth=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed over 15 steps)")
    # The title names every option; wrapped, it stays inside the figure.
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(directory: Path) -> Path:
    """Draw ``directory/seeds.png`` again from the losses and configuration a run wrote there."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--replot: {directory} holds no config.json of a bench_train.py run")
    config = json.loads(config_path.read_text())
    losses: dict[int, dict[str, list[float]]] = {}
    for seed in config["seeds"]:
        csv_path = directory / f"seed_{seed}" / "losses.csv"
        if not csv_path.is_file():
            raise ValueError(f"--replot: {csv_path} is missing (config.json lists seed {seed})")
        with csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        losses[seed] = {name: [float(r[f"loss_{name}"]) for r in rows] for name in ("inductor", "adacc")}
    path = directory / "seeds.png"
    _plot(path, losses, _title(config["budget"], config.get("options") or {}, config.get("compress")))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip of both runs (0: none)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate of both runs")
    p.add_argument("--batch", type=int, default=TrainConfig.batch, help="sequences per step")
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--compress", choices=["lossy", "lossless", "off"], default=None)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="other adacc options")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_seeds")
    p.add_argument("--replot", type=Path, metavar="DIR", help="only draw DIR/seeds.png again from a run's files")
    args = p.parse_args(argv)
    if args.replot is not None:
        print(f"wrote {replot(args.replot)}")
        return 0
    options = _parse_options(args.option)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[int, TrainResult] = {}
    rows = []
    for seed in args.seeds:
        torch._dynamo.reset()
        out = args.out / f"seed_{seed}"
        config = TrainConfig(
            budget=args.budget,
            steps=args.steps,
            seed=seed,
            grad_clip=args.grad_clip or None,
            lr=args.lr,
            batch=args.batch,
            warmup_steps=args.warmup_steps,
            out=out,
            progress=False,
            compress=args.compress,
            options=options,
        )
        result = run_train(config)
        shutil.rmtree(out / "dumps", ignore_errors=True)
        results[seed] = result
        rows.append(_row(seed, result))
        print(_table(rows[-1:]).splitlines()[1], flush=True)
    with open(args.out / "seeds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = _table(rows)
    (args.out / "seeds.txt").write_text(table + "\n")
    (args.out / "config.json").write_text(
        json.dumps({"budget": args.budget, "steps": args.steps, "seeds": args.seeds, "grad_clip": args.grad_clip or None,
                    "lr": args.lr, "batch": args.batch, "warmup_steps": args.warmup_steps,
                    "compress": args.compress,
                    "options": options, "torch": torch.__version__}, indent=2) + "\n"
    )
    losses = {seed: {name: r.runs[name].losses for name in ("inductor", "adacc")} for seed, r in results.items()}
    _plot(args.out / "seeds.png", losses, _title(args.budget, options, args.compress))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
