"""The ``adacc`` command: ``adacc train``, ``adacc explain`` and ``adacc bench``.

* ``adacc train`` trains a small Llama on the Python standard library's source
  with adacc under a memory budget next to stock Inductor, and writes a
  comparison table and plots (:mod:`adacc_compiler.train`).
* ``adacc explain`` compiles a model with adacc, runs one step and prints each
  graph's plan (per-tensor decisions), writing adacc's dumps.
* ``adacc bench`` compares eager, activation checkpointing, stock Inductor,
  PyTorch's budgeted partitioner and adacc side by side
  (:mod:`adacc_compiler.bench`); ``--check`` turns it into a regression check
  against a baseline, ``--plot`` draws a Pareto figure from saved results.

Installed as a console script; ``python -m adacc_compiler.cli`` works too.
"""

from __future__ import annotations

# OpenMP's wait policy is left to the environment. Sleeping waits
# (OMP_WAIT_POLICY=PASSIVE) steady timings on a machine other jobs share, but
# every parallel region then pays a thread wake-up: on 2 cores stock
# Inductor's Llama step took 77-78 ms instead of 65-74 ms, and a plan that adds
# kernels (codecs, recomputation) pays it once more per kernel, so the
# comparison no longer reflects a training run's own runtime.

import argparse
import logging
import sys
import textwrap
from pathlib import Path

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _paragraphs(*paras: str) -> str:
    return "\n\n".join(textwrap.fill(p, 79) for p in paras)


def _budget_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


_COMPRESS = ("lossy", "lossless", "off")


def _model_names() -> list[str]:
    # The names only: importing adacc_compiler.models would import torch.
    return ["gpt", "gpt2", "llama"]


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark model and its shape (adacc_compiler.models.make_model)."""
    p.add_argument("--model", choices=_model_names(), default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="batch size (model default 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (model default 128)")
    p.add_argument("--width", type=int, default=None, help="hidden size (model default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adacc",
        description="adacc: a torch.compile backend that fits training into a memory budget.",
        formatter_class=_Formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log adacc's plans (INFO) and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{train,explain,bench}")
    sub.required = True

    # -- train
    t = sub.add_parser(
        "train",
        help="train a small Llama on real text with adacc next to stock Inductor",
        description=_paragraphs(
            "Train a byte-level Hugging Face Llama (random init) on the Python standard library's source "
            "with adacc at --budget, step for step next to the same model on stock Inductor; print a table "
            "(measured saved and peak memory, step-time ratio, final and held-out loss) and write "
            "summary.json, losses.csv, loss_curves.png, memory_timeline.png and adacc's dumps to --out."
        ),
        formatter_class=_Formatter,
    )
    t.add_argument("--budget", type=_budget_fraction, default=0.5, help="adacc memory_budget: fraction of stock Inductor's activation peak")
    t.add_argument("--steps", type=int, default=400, help="training steps (each runs both models)")
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--width", type=int, default=192, help="hidden size (4 query heads, 2 KV heads)")
    t.add_argument("--seq", type=int, default=128, help="sequence length in bytes")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warm-up, then cosine decay)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this before each step (0: no clipping)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("adacc_train_out"), help="output directory")
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    t.add_argument("--compress", choices=_COMPRESS, default=None, help="adacc's compress option (default: adacc's own, see README)")
    _add_option_argument(t)

    # -- explain
    e = sub.add_parser(
        "explain",
        help="compile a model with adacc, run one step, print the plan and write the dumps",
        description=_paragraphs(
            "Compile a benchmark model with adacc at --budget, run one training step, and print each "
            "compiled graph's plan: a header (budget, stock Inductor's saved bytes and peak, the plan's "
            "predicted peak, decision counts, solver status) and one row per activation (tensor, shape, "
            "dtype, bytes, producer op, layer, decision, estimated recompute cost). The dumps "
            "(graphs as code, plan, solver summary, memory timeline CSV and PNG) go to --dump-dir."
        ),
        formatter_class=_Formatter,
    )
    _add_model_arguments(e)
    e.add_argument("--budget", type=_budget_fraction, default=0.5)
    e.add_argument("--dump-dir", type=Path, default=Path("adacc_dumps"))
    e.add_argument("--no-profile", action="store_true", help="roofline op costs instead of timing each op")
    e.add_argument("--compress", choices=_COMPRESS, default=None, help="adacc's compress option (default: adacc's own)")
    _add_option_argument(e)

    # -- bench
    b = sub.add_parser(
        "bench",
        help="eager, checkpointing, Inductor, PyTorch's budget and adacc side by side; regression check; Pareto plot",
        description=_paragraphs(
            "Compare eager, activation checkpointing (ac), stock Inductor, Inductor with "
            "activation_memory_budget (pt<b>) and adacc (adacc<b>) side by side in one process on a "
            "named model: measured saved and peak memory, step-time ratio to stock Inductor (median of "
            "interleaved rounds), gradient error, compile time. Writes <out>/e2e_<model><layers><tag>"
            ".csv, .json, _machine.json and _pareto.png.",
            "Regression check: --check BASELINE.json compares each adacc variant with the baseline "
            "(a results JSON or a --save-baseline file): it fails when a step-time ratio exceeds the "
            "baseline's by more than --tolerance (relative: ratio > baseline * (1 + T)), when "
            "measured saved memory exceeds the variant's budget by more than 2%, or when its gradient "
            "is wrong (relative error against eager fp32 above 0.5). Exit code 1 on failure, 0 on success.",
            "Plot only: --plot A.json B.json ... --out FIG.png draws one Pareto figure (a subplot per "
            "model) from saved results without running anything."
        ),
        formatter_class=_Formatter,
    )
    _add_model_arguments(b)
    b.add_argument("--budgets", type=_budget_fraction, nargs="*", default=[0.7, 0.6, 0.5, 0.45, 0.4], help="adacc memory_budget values")
    b.add_argument(
        "--pt-budgets", type=_budget_fraction, nargs="*", default=[0.7, 0.5, 0.3, 0.1],
        help="torch._functorch.config.activation_memory_budget values",
    )
    b.add_argument(
        "--variants", default=None,
        help="comma-separated names or families to run, e.g. eager,ac,inductor,pt or inductor,adacc0.5 (default: all)",
    )
    b.add_argument("--baseline-variant", default="inductor", help="variant the step ratios are relative to")
    b.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, default=None, help="output directory (default adacc_bench_out); with --plot, the PNG file")
    b.add_argument("--tag", default="", help="suffix for the output file names")
    b.add_argument("--check", type=Path, default=None, metavar="BASELINE.json", help="fail if this run regresses against the baseline")
    b.add_argument("--tolerance", type=float, default=0.10, help="relative step-ratio tolerance of --check (0.10 = 10%%)")
    b.add_argument("--save-baseline", type=Path, default=None, metavar="PATH", help="also write this run as a baseline JSON")
    b.add_argument("--plot", type=Path, nargs="+", default=None, metavar="RESULTS.json", help="only draw a Pareto figure from these results")
    b.add_argument("--x", choices=["saved", "peak", "both"], default="saved", help="memory on the Pareto plot's x axis")
    b.add_argument("--compress", choices=_COMPRESS, default=None, help="adacc's compress option for every adacc variant (default: adacc's own)")
    _add_option_argument(b)
    return parser


# Options each subcommand sets its own way, and how.
_FLAG_OPTIONS = {
    "train": {"memory_budget": "--budget", "compress": "--compress", "dump_dir": "--out (the dumps go to OUT/dumps)"},
    "explain": {"memory_budget": "--budget", "compress": "--compress", "dump_dir": "--dump-dir"},
    "bench": {"memory_budget": "--budgets", "compress": "--compress"},
}


def _add_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="any other adacc option for the adacc runs, e.g. --option compress_sensitive=true "
        "--option min_sqnr_db=40 (repeatable; see the README's options table)",
    )


def _parse_options(pairs: list[str], command: str = "train") -> dict[str, str]:
    """``KEY=VALUE`` strings as adacc options for ``command``, validated as torch.compile would."""
    from adacc_compiler.config import AdaccConfig

    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--option: expected KEY=VALUE, got {pair!r}")
        flag = _FLAG_OPTIONS[command].get(key)
        if flag is not None:
            raise ValueError(f"--option: adacc {command} sets {key!r} with {flag}")
        options[key] = value.strip()
    AdaccConfig.from_options(options, environ={})  # unknown keys and bad values fail here, naming the option
    return options


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("adacc_compiler").setLevel(logging.INFO)


def _cmd_train(args: argparse.Namespace) -> int:
    from adacc_compiler.train import TrainConfig, format_summary, run_train

    config = TrainConfig(
        budget=args.budget,
        steps=args.steps,
        layers=args.layers,
        width=args.width,
        seq=args.seq,
        batch=args.batch,
        lr=args.lr,
        grad_clip=args.grad_clip or None,
        seed=args.seed,
        out=args.out,
        progress=not args.no_progress,
        compress=args.compress,
        options=_parse_options(args.option, "train"),
    )
    result = run_train(config)
    print()
    print(format_summary(result))
    print(f"\nwrote {', '.join(str(p) for p in result.paths)} in {result.elapsed_s:.0f} s")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from adacc_compiler.backend import compiled_graphs
    from adacc_compiler.bench import adacc_backend_ref, make_step
    from adacc_compiler.measure import saved_activation_bytes
    from adacc_compiler.models import loss_of, make_model

    kw = {k: getattr(args, k) for k in ("batch", "seq", "width") if getattr(args, k) is not None}
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    model, batch = make_model(args.model, args.layers, **kw)
    options = {"memory_budget": args.budget, "dump_dir": str(args.dump_dir)}
    if args.no_profile:
        options["profile"] = False
    if args.compress is not None:
        options["compress"] = args.compress
    options.update(_parse_options(args.option, "explain"))
    fwd = torch.compile(model, backend=adacc_backend_ref(), options=options)
    before = len(compiled_graphs())
    make_step(model, fwd, batch)()
    records = compiled_graphs()[before:]
    if not records:
        print("adacc compiled no graph that needs gradients", file=sys.stderr)
        return 1
    exclude = [*model.parameters(), *model.buffers(), *batch.values()]
    saved = saved_activation_bytes(lambda: loss_of(fwd(**batch)), exclude=exclude)
    shape = "x".join(str(s) for s in next(iter(batch.values())).shape)
    print(f"{args.model}, {args.layers} layers, batch {shape}, memory_budget={args.budget:g}: {len(records)} graph(s)\n")
    for r in records:
        plan_txt = Path(r.dump_path) / "plan.txt" if r.dump_path else None
        if plan_txt is not None and plan_txt.is_file():
            print(plan_txt.read_text().rstrip())
        else:
            print(r.plan.table())
        print()
    budget = sum(r.plan.budget_bytes for r in records)
    print(
        f"measured: one forward saves {saved / 2**20:.2f} MiB for the backward "
        f"(budget {budget / 2**20:.2f} MiB, {'within' if saved <= budget else 'OVER'} it)"
    )
    dirs = sorted({str(Path(r.dump_path)) for r in records if r.dump_path})
    print("dumps: " + ", ".join(dirs) + " (see README.md, 'Reading the dumps')")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from adacc_compiler import bench

    axes = ("saved", "peak") if args.x == "both" else (args.x,)
    if args.plot:
        if args.check or args.save_baseline:
            raise ValueError("--plot: only draws a figure; it cannot be combined with --check or --save-baseline")
        out = args.out if args.out is not None else Path("pareto.png")
        if out.suffix.lower() != ".png":
            out = out / "pareto.png"
        runs = [bench.load_results(p)[0] for p in args.plot]
        if not bench.plot_pareto(runs, out, x=axes):
            return 1
        print(f"wrote {out}")
        return 0

    config = bench.BenchConfig(
        model=args.model,
        layers=args.layers,
        batch=args.batch,
        seq=args.seq,
        width=args.width,
        budgets=tuple(args.budgets),
        pt_budgets=tuple(args.pt_budgets),
        variants=args.variants,
        baseline=args.baseline_variant,
        rounds=args.rounds,
        warmup=args.warmup,
        seed=args.seed,
        out=args.out if args.out is not None else Path("adacc_bench_out"),
        tag=args.tag,
        compress=args.compress,
        options=_parse_options(args.option, "bench"),
    )
    baseline_rows = None
    if args.check is not None:
        # Read the baseline first: a missing file should not cost a whole run.
        baseline_rows, baseline_meta = bench.load_results(args.check)
        bench.check_setup_matches(config, baseline_meta)
        if args.tolerance < 0:
            raise ValueError(f"--tolerance: must be >= 0 (relative, 0.10 = 10%), got {args.tolerance}")
    result = bench.run_bench(config)
    if args.x != "saved" and result.paths:
        bench.plot_pareto([result.rows], config.out / f"{config.stem}_pareto.png", x=axes)
    if args.save_baseline is not None:
        result.paths.append(bench.save_baseline(args.save_baseline, result.rows, result.meta))
    meta = result.meta
    print()
    print(
        f"{config.model} {config.layers} layers, batch {tuple(meta['batch_shape'])}, {meta['n_params'] / 1e6:.2f} M params; "
        f"ratios to {meta['baseline']}, median of {config.rounds} interleaved rounds"
    )
    print(bench.format_table(result.rows))
    print(f"\nwrote {', '.join(str(p) for p in result.paths)} in {meta['elapsed_s']:.0f} s")
    if baseline_rows is not None:
        report = bench.check_results(result.rows, baseline_rows, tolerance=args.tolerance)
        print()
        print(report.format())
        return 0 if report.ok else 1
    return 0 if result.ok else 1


_COMMANDS = {"train": _cmd_train, "explain": _cmd_explain, "bench": _cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Run the ``adacc`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, RuntimeError) as err:
        if args.verbose:
            log.exception("adacc %s failed", args.command)
        text = str(err).strip().splitlines()
        print(f"adacc {args.command}: error: {text[0] if text else type(err).__name__}", file=sys.stderr)
        for line in text[1:3]:
            print(f"  {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adacc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
