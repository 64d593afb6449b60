"""The main job: train a small Llama on real text with adacc, next to stock Inductor.

``adacc train`` (see :mod:`adacc_compiler.cli`) runs :func:`run_train`: a
byte-level Hugging Face ``LlamaForCausalLM`` (small config, random init) is
trained on the Python standard library's own source (present in every Python
install, so nothing is downloaded), compiled with ``backend="adacc"`` at a
memory budget, and, step for step on the same batches, the same model compiled
with stock Inductor. The two runs alternate within each step, so their step
times are measured side by side.

At the end it measures, for both, what one forward saves for the backward
(saved-tensor pack hooks) and the peak memory of one step, and writes to the
output directory:

``summary.json``  the table below as JSON, plus the plan and the configuration
``losses.csv``    per step: training loss and step time of both runs
``loss_curves.png``   both training loss curves, and the held-out loss
``memory_timeline.png``  adacc's memory timeline (stock vs plan vs budget)
                  from adacc's own dumps, which are kept under ``dumps/``

and prints a table: measured saved and peak memory, the step-time ratio
(median of the per-step ratios after the compiling steps) and the final and
held-out losses.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import shutil
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["TrainConfig", "TrainResult", "run_train", "stdlib_corpus", "format_summary"]

log = logging.getLogger(__name__)

MiB = float(1 << 20)
#: Byte-level model: one token per byte.
VOCAB = 256
#: Steps excluded from the step-time ratio: the first compiles, the next
#: warm Inductor's and the allocator's caches.
_UNTIMED_STEPS = 3


def stdlib_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's ``.py`` files, in a fixed order, as a long tensor."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes: must be positive, got {max_bytes}")
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


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`run_train` trains. Every field is validated on construction."""

    budget: float = 0.5
    steps: int = 400
    layers: int = 4
    width: int = 192
    seq: int = 128
    batch: int = 8
    # At 2e-3 this model trains chaotically: two runs that differ only in
    # rounding end up to 2.5% apart in held-out loss after 300 steps, which
    # hides any effect of a plan on accuracy. At 1e-3 they agree within
    # 0.02% and the loss ends lower (bench/results/train_floor_lr*).
    lr: float = 1e-3
    warmup_steps: int = 20
    # Clip the gradient's global norm before each step, as LLM recipes do; None: no clipping.
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_batches: int = 32
    corpus_bytes: int = 2_000_000
    out: Path = Path("adacc_train_out")
    progress: bool = True
    compress: str | None = None  # adacc's `compress` option; None: its default
    # Any other adacc options (validated by AdaccConfig).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from adacc_compiler.config import AdaccConfig

        bad = sorted(set(self.options) & {"memory_budget", "compress", "dump_dir"})
        if bad:
            raise ValueError(f"options: set {', '.join(bad)} through the budget, compress and out fields")
        AdaccConfig.from_options(self.options, environ={})
        if self.compress is not None and self.compress not in ("lossy", "lossless", "off"):
            raise ValueError(f"compress: must be 'lossy', 'lossless' or 'off' (or None for adacc's default), got {self.compress!r}")
        if not (isinstance(self.budget, (int, float)) and 0.0 < self.budget <= 1.0):
            raise ValueError(f"budget: must be a fraction in (0, 1] of stock Inductor's activation peak, got {self.budget!r}")
        for name in ("steps", "layers", "width", "seq", "batch", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.steps <= _UNTIMED_STEPS:
            raise ValueError(f"steps: must exceed {_UNTIMED_STEPS} (the untimed compiling steps), got {self.steps}")
        if self.width % 4:
            raise ValueError(f"width: must be a multiple of 4 (the number of heads), got {self.width}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: must be a positive number, got {self.lr}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip: must be a positive number or None (no clipping), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be at least 0, got {self.warmup_steps}")
        if self.corpus_bytes < 20 * (self.seq + 1):
            raise ValueError(f"corpus_bytes: must be at least 20 sequences long, got {self.corpus_bytes}")
        object.__setattr__(self, "out", Path(self.out))


@dataclass
class RunStats:
    """What was measured for one of the two runs."""

    name: str
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    eval_loss: float | None = None

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 steps (one step's loss is one batch's noise)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


@dataclass
class TrainResult:
    config: TrainConfig
    runs: dict[str, RunStats]
    step_ratio: float
    plan: dict[str, Any]
    paths: list[Path]
    elapsed_s: float


class _Progress:
    """A one-line progress bar on a stream; plain lines every 10% when it is not a terminal."""

    def __init__(self, total: int, *, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1

    def note(self, msg: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + msg + "\n")
            self.stream.flush()

    def update(self, done: int, text: str, *, timed_from: int = 0, t_timed: float | None = None) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        eta = ""
        if t_timed is not None and done > timed_from:
            per_step = (time.perf_counter() - t_timed) / (done - timed_from)
            eta = f"  eta {_minutes(per_step * (self.total - done))}"
        line = f"train [{bar}] {done:4d}/{self.total}  {text}  {_minutes(time.perf_counter() - self.t0)}{eta}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            decile = 10 * done // self.total
            if decile != self._last_decile or done == self.total:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()


def _minutes(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def _lr_lambda(config: TrainConfig):
    # Linear warm-up, then cosine decay to 10% of the peak rate.
    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _build_model(config: TrainConfig) -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise RuntimeError(
            "adacc train needs `transformers` for its Llama model; install it with "
            "`pip install transformers` (or `pip install -e '.[dev]'`, which scripts/setup.sh runs)"
        ) from None
    from adacc_compiler.models import llama_config

    transformers.logging.set_verbosity_error()
    cfg = llama_config(layers=config.layers, width=config.width, vocab=VOCAB, max_seq=config.seq)
    torch.manual_seed(config.seed)
    return transformers.LlamaForCausalLM(cfg).float().train()


def run_train(config: TrainConfig, *, stream: TextIO | None = None) -> TrainResult:
    """Train with adacc and with stock Inductor side by side; measure, write and return the results."""
    from adacc_compiler.backend import compiled_graphs
    from adacc_compiler.bench import adacc_backend_ref
    from adacc_compiler.measure import peak_memory_bytes, saved_activation_bytes

    stream = stream if stream is not None else sys.stderr
    t_start = time.perf_counter()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    dump_dir = out / "dumps"
    # Dumps of an earlier run would be mixed with this run's.
    shutil.rmtree(dump_dir, ignore_errors=True)

    data = stdlib_corpus(config.corpus_bytes)
    n_eval = max(config.eval_batches * config.batch * (config.seq + 1), len(data) // 20)
    train_data, eval_data = data[:-n_eval], data[-n_eval:]
    base = _build_model(config)
    n_params = sum(p.numel() for p in base.parameters())
    prog = _Progress(config.steps, stream=stream, enabled=config.progress)
    prog.note(
        f"adacc train: Llama, {config.layers} layers, width {config.width}, {n_params / 1e6:.2f} M parameters; "
        f"batch {config.batch} x {config.seq} bytes of the Python standard library's source "
        f"({len(train_data):,} bytes for training, {len(eval_data):,} held out); "
        f"adacc at memory_budget={config.budget:g} next to stock Inductor"
    )

    names = ("inductor", "adacc")
    models = {n: copy.deepcopy(base) for n in names}
    compiled = {
        "inductor": torch.compile(models["inductor"], backend="inductor"),
        "adacc": torch.compile(
            models["adacc"],
            backend=adacc_backend_ref(),
            options={
                "memory_budget": config.budget,
                "dump_dir": str(dump_dir),
                **config.options,
                **({} if config.compress is None else {"compress": config.compress}),
            },
        ),
    }
    optims = {n: torch.optim.AdamW(models[n].parameters(), lr=config.lr, weight_decay=0.1) for n in names}
    scheds = {n: torch.optim.lr_scheduler.LambdaLR(optims[n], _lr_lambda(config)) for n in names}
    stats = {n: RunStats(n) for n in names}
    gen = torch.Generator().manual_seed(config.seed)

    def sample(src: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(src) - config.seq - 1, (config.batch,), generator=g)
        return torch.stack([src[s : s + config.seq] for s in starts.tolist()])

    plans_before = len(compiled_graphs())
    t_timed = None
    for step in range(config.steps):
        ids = sample(train_data, gen)
        # Alternate the order so neither run always follows the other.
        order = names if step % 2 == 0 else names[::-1]
        for n in order:
            if step == 0:
                prog.note(f"compiling the {'adacc' if n == 'adacc' else 'stock Inductor'} model (first step) ...")
            t0 = time.perf_counter()
            loss = compiled[n](input_ids=ids, labels=ids).loss
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(models[n].parameters(), config.grad_clip)
            optims[n].step()
            optims[n].zero_grad(set_to_none=True)
            stats[n].step_s.append(time.perf_counter() - t0)
            stats[n].losses.append(float(loss.detach()))
            scheds[n].step()
        if step + 1 == _UNTIMED_STEPS:
            t_timed = time.perf_counter()
        prog.update(
            step + 1,
            f"loss inductor {stats['inductor'].losses[-1]:.3f} adacc {stats['adacc'].losses[-1]:.3f}",
            timed_from=_UNTIMED_STEPS,
            t_timed=t_timed,
        )
    for n in names:
        if not all(math.isfinite(x) for x in stats[n].losses):
            raise RuntimeError(f"the {n} run's loss became non-finite; lower --lr")

    prog.note("measuring saved and peak memory of one step of each run ...")
    ids = sample(train_data, torch.Generator().manual_seed(config.seed + 1))
    for n in names:
        model, fn = models[n], compiled[n]
        exclude = [*model.parameters(), *model.buffers(), ids]
        stats[n].saved_bytes = saved_activation_bytes(lambda: fn(input_ids=ids, labels=ids).loss, exclude=exclude)

        def one_step(model=model, fn=fn) -> None:
            fn(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

        stats[n].peak_bytes = peak_memory_bytes(one_step, device="cpu")
    # Held-out loss on the uncompiled modules (same weights): a no-grad graph
    # would only cost another compile per run.
    eval_gen = torch.Generator().manual_seed(config.seed + 2)
    eval_ids = [sample(eval_data, eval_gen) for _ in range(config.eval_batches)]
    with torch.no_grad():
        for n in names:
            models[n].eval()
            stats[n].eval_loss = statistics.fmean(float(models[n](input_ids=x, labels=x).loss) for x in eval_ids)
            models[n].train()

    ratios = [a / b for a, b in zip(stats["adacc"].step_s[_UNTIMED_STEPS:], stats["inductor"].step_s[_UNTIMED_STEPS:])]
    step_ratio = statistics.median(ratios)
    records = compiled_graphs()[plans_before:]
    if not records:
        raise RuntimeError("adacc compiled no graph that needs gradients; nothing was planned")
    plan_info = _plan_info(records)

    paths = _write_outputs(config, stats, step_ratio, plan_info, records, n_params, time.perf_counter() - t_start)
    result = TrainResult(config, stats, step_ratio, plan_info, paths, time.perf_counter() - t_start)
    return result


def _plan_info(records: list[Any]) -> dict[str, Any]:
    graphs = []
    for r in records:
        p = r.plan
        graphs.append(
            {
                "graph_id": p.graph_id,
                "budget_bytes": p.budget_bytes,
                "stock_peak_bytes": p.stock_peak_bytes,
                "stock_saved_bytes": p.stock_saved_bytes,
                "predicted_saved_bytes": p.predicted_saved_bytes,
                "predicted_peak_bytes": p.predicted_peak_bytes,
                "counts": p.counts(),
                "solver_status": p.solver.status,
                "solver_time_s": p.solver.time_s,
                "dump_path": r.dump_path,
                # Set on a re-plan (policy evolution): the graph it took over from, and why.
                "replaces": r.replaces,
                "notes": list(p.notes),
            }
        )
    replaced = {g["replaces"] for g in graphs}
    # The graphs running at the end: a re-planned graph counts once.
    return {"graphs": graphs, "budget_bytes": sum(g["budget_bytes"] for g in graphs if g["graph_id"] not in replaced)}


def format_summary(result: TrainResult) -> str:
    """The comparison table and a line on adacc's plan."""
    cfg = result.config
    ind, ada = result.runs["inductor"], result.runs["adacc"]
    header = f"{'run':<20} {'saved MiB':>10} {'peak MiB':>9} {'step ratio':>10} {'final loss':>10} {'held-out loss':>13}"
    lines = [header, "-" * len(header)]
    for label, s, ratio in (("stock Inductor", ind, 1.0), (f"adacc (budget {cfg.budget:g})", ada, result.step_ratio)):
        lines.append(
            f"{label:<20} {s.saved_bytes / MiB:>10.2f} {s.peak_bytes / MiB:>9.2f} {ratio:>10.3f} "
            f"{s.final_loss:>10.4f} {s.eval_loss:>13.4f}"
        )
    n_ratios = len(ind.step_s) - _UNTIMED_STEPS
    lines.append("")
    lines.append(
        f"adacc saves {100 * (1 - ada.saved_bytes / ind.saved_bytes):.0f}% less for the backward "
        f"and peaks {100 * (1 - ada.peak_bytes / ind.peak_bytes):.0f}% lower."
    )
    lines.append(f"step ratio: median of {n_ratios} interleaved per-step ratios adacc / Inductor (optimizer step included)")
    lines.append(f"final loss: mean of the last 10 training steps; held-out loss: {cfg.eval_batches} batches never trained on")
    for g in result.plan["graphs"]:
        c = g["counts"]
        decisions = ", ".join(f"{k} {v}" for k, v in c.items() if v and k != "drop")
        if g.get("replaces"):
            # The reason is the plan's first note: "re-plan of X at call N, its codecs drifted: ...".
            lines.append(f"adacc plan {g['graph_id']}: {g['notes'][0]}")
            lines.append(f"  budget {g['budget_bytes'] / MiB:.2f} MiB, as before,")
        else:
            lines.append(
                f"adacc plan {g['graph_id']}: budget {g['budget_bytes'] / MiB:.2f} MiB of stock Inductor's "
                f"{g['stock_peak_bytes'] / MiB:.2f} MiB activation peak,"
            )
        lines.append(
            f"  predicted peak {g['predicted_peak_bytes'] / MiB:.2f} MiB, saves {g['predicted_saved_bytes'] / MiB:.2f} MiB; "
            f"{decisions}; solver {g['solver_status']} in {g['solver_time_s']:.2f} s"
        )
    return "\n".join(lines)


def _write_outputs(
    config: TrainConfig,
    stats: dict[str, RunStats],
    step_ratio: float,
    plan_info: dict[str, Any],
    records: list[Any],
    n_params: int,
    elapsed_s: float,
) -> list[Path]:
    out = config.out
    paths = []
    losses = out / "losses.csv"
    with losses.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_inductor", "loss_adacc", "step_s_inductor", "step_s_adacc"])
        for i, row in enumerate(
            zip(stats["inductor"].losses, stats["adacc"].losses, stats["inductor"].step_s, stats["adacc"].step_s)
        ):
            w.writerow([i, *(f"{v:.6g}" for v in row)])
    paths.append(losses)

    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "model": {"kind": "LlamaForCausalLM", "n_params": n_params, "vocab": VOCAB},
        "step_ratio": step_ratio,
        "runs": {
            n: {
                "saved_bytes": s.saved_bytes,
                "peak_bytes": s.peak_bytes,
                "final_loss": s.final_loss,
                "eval_loss": s.eval_loss,
                "median_step_s": statistics.median(s.step_s[_UNTIMED_STEPS:]),
                "compile_step_s": s.step_s[0],
            }
            for n, s in stats.items()
        },
        "plan": plan_info,
        "elapsed_s": elapsed_s,
        "torch_version": torch.__version__,
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    paths.append(summary_path)

    curves = out / "loss_curves.png"
    if _plot_losses(curves, config, stats):
        paths.append(curves)
    # The timeline of the graph with the largest activation peak: the
    # training step's own graph when Dynamo split the model.
    main = max(records, key=lambda r: r.plan.stock_peak_bytes)
    timeline = Path(main.dump_path or "") / "memory_timeline.png"
    if main.dump_path and timeline.is_file():
        shutil.copyfile(timeline, out / "memory_timeline.png")
        paths.append(out / "memory_timeline.png")
    paths.append(out / "dumps")
    return paths


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _plot_losses(path: Path, config: TrainConfig, stats: dict[str, RunStats]) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; loss_curves.png is not written (pip install matplotlib)")
        return False
    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    k = max(1, config.steps // 30)
    styles = {"inductor": ("tab:gray", "stock Inductor"), "adacc": ("tab:blue", f"adacc (budget {config.budget:g})")}
    for n, s in stats.items():
        color, label = styles[n]
        steps = range(len(s.losses))
        ax.plot(steps, s.losses, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, _smooth(s.losses, k), color=color, label=f"{label}, running mean of {k}")
        ax.axhline(s.eval_loss, color=color, linestyle="--", linewidth=1, label=f"{label}, held-out {s.eval_loss:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(
        f"Llama, {config.layers} layers, width {config.width}, on the standard library's source "
        f"(batch {config.batch} x {config.seq} bytes)"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True
