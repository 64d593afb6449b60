"""The ``adacc`` command: the regression check's logic, plots, and each subcommand end to end.

The end-to-end tests run the commands in-process on tiny models. The
regression check runs exactly as CI users run it (``adacc bench --check``)
against the committed baseline in ``bench/baselines/``: it must pass on this
code and fail when the adacc step is made three times slower.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adacc_compiler import bench, cli
from adacc_compiler.bench import BenchConfig, check_results, load_results, plot_pareto
from adacc_compiler.config import AdaccConfig
from adacc_compiler.models import MODELS
from adacc_compiler.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CI_BASELINE = REPO / "bench" / "baselines" / "ci_gpt_2.json"
# The command the committed baseline was written with (bench/baselines/README.md).
CI_BENCH_ARGS = [
    "bench", "--model", "gpt", "--layers", "2", "--width", "128",
    "--variants", "inductor,adacc", "--budgets", "0.5", "--rounds", "30", "--warmup", "3",
]  # fmt: skip
CI_TOLERANCE = "0.5"


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the check's logic


def _row(variant, *, ratio=1.0, saved=10.0, budget_mib=None, status="ok", error="", model="llama", layers=4):
    budget = None
    for fam in ("adacc", "pt"):
        if variant.startswith(fam):
            budget = float(variant[len(fam):])
    return {
        "model": model, "layers": layers, "variant": variant, "budget": budget, "saved_mib": saved,
        "step_ratio": ratio, "budget_mib": budget_mib, "status": status, "error": error,
    }  # fmt: skip


def _run(*adacc_rows, inductor_status="ok"):
    return [
        _row("inductor", ratio=1.0, saved=40.0, status=inductor_status),
        _row("pt0.5", ratio=1.3, saved=20.0),
        *adacc_rows,
    ]


BASELINE = _run(
    _row("adacc0.5", ratio=1.10, saved=19.0, budget_mib=19.7),
    _row("adacc0.3", status="failed", error="InfeasibleBudgetError: smallest budget ..."),
)


def test_check_passes_within_tolerance():
    now = _run(
        _row("adacc0.5", ratio=1.20, saved=19.5, budget_mib=19.7),
        _row("adacc0.3", status="failed", error="InfeasibleBudgetError: smallest budget ..."),
    )
    report = check_results(now, BASELINE, tolerance=0.10)
    assert report.ok, report.format()
    assert report.checked == ["adacc0.5"]
    # Failing in both runs is not a regression, but it is reported.
    assert any("adacc0.3" in n for n in report.notes)
    assert "PASSED" in report.format()


def test_check_fails_on_slower_ratio_and_names_the_variant():
    now = _run(_row("adacc0.5", ratio=1.25, saved=19.5, budget_mib=19.7), _row("adacc0.3", status="failed"))
    report = check_results(now, BASELINE, tolerance=0.10)
    assert not report.ok
    (msg,) = report.failures
    assert msg.startswith("adacc0.5: step-time ratio")
    assert "1.250" in msg and "1.100" in msg and "tolerance 10%" in msg
    assert "FAILED" in report.format()


def test_check_tolerance_is_relative_and_inclusive():
    limit = 1.10 * 1.10
    at_limit = _run(_row("adacc0.5", ratio=limit, saved=19.0, budget_mib=19.7), _row("adacc0.3", status="failed"))
    assert check_results(at_limit, BASELINE, tolerance=0.10).ok
    over = _run(_row("adacc0.5", ratio=limit + 1e-3, saved=19.0, budget_mib=19.7), _row("adacc0.3", status="failed"))
    assert not check_results(over, BASELINE, tolerance=0.10).ok
    # A generous tolerance lets the same run pass.
    assert check_results(over, BASELINE, tolerance=0.5).ok


def test_check_fails_when_saved_memory_exceeds_the_budget():
    within = _run(_row("adacc0.5", ratio=1.1, saved=19.7 * 1.019, budget_mib=19.7), _row("adacc0.3", status="failed"))
    assert check_results(within, BASELINE, tolerance=0.1).ok
    over = _run(_row("adacc0.5", ratio=1.1, saved=19.7 * 1.03, budget_mib=19.7), _row("adacc0.3", status="failed"))
    report = check_results(over, BASELINE, tolerance=0.1)
    (msg,) = report.failures
    assert msg.startswith("adacc0.5: measured saved memory") and "allowance 2%" in msg


def test_check_fails_on_a_wrong_gradient():
    ok = _run(dict(_row("adacc0.5", ratio=1.1, saved=19.0, budget_mib=19.7), grad_rel_err=0.04), _row("adacc0.3", status="failed"))
    assert check_results(ok, BASELINE, tolerance=0.1).ok
    for bad in (2.8e9, float("nan")):
        now = _run(dict(_row("adacc0.5", ratio=1.1, saved=19.0, budget_mib=19.7), grad_rel_err=bad), _row("adacc0.3", status="failed"))
        (msg,) = check_results(now, BASELINE, tolerance=0.1).failures
        assert msg.startswith("adacc0.5: gradient relative error")


def test_check_fails_on_new_failure_and_missing_variant():
    now = _run(_row("adacc0.5", status="failed", error="BudgetExceededError: boom"))
    report = check_results(now, BASELINE, tolerance=0.1)
    assert any(m.startswith("adacc0.5: failed: BudgetExceededError") for m in report.failures)
    # adacc0.3 was in the baseline but was not run now.
    assert any(m.startswith("adacc0.3: in the baseline but not run") for m in report.failures)


def test_check_variant_not_in_baseline_gets_memory_check_only():
    now = _run(
        _row("adacc0.5", ratio=1.1, saved=19.0, budget_mib=19.7),
        _row("adacc0.3", status="failed"),
        _row("adacc0.4", ratio=5.0, saved=15.0, budget_mib=15.7),
    )
    report = check_results(now, BASELINE, tolerance=0.1)
    assert report.ok, report.format()
    assert any(n.startswith("adacc0.4: not in the baseline") for n in report.notes)
    now[-1]["saved_mib"] = 17.0
    assert not check_results(now, BASELINE, tolerance=0.1).ok


def test_check_fails_without_stock_inductor_or_adacc():
    now = _run(_row("adacc0.5", ratio=1.1, saved=19.0, budget_mib=19.7), _row("adacc0.3", status="failed"), inductor_status="failed")
    report = check_results(now, BASELINE, tolerance=0.1)
    assert any(m.startswith("inductor: stock Inductor failed") for m in report.failures)
    only_stock = [_row("inductor")]
    assert not check_results(only_stock, [_row("inductor")], tolerance=0.1).ok


def test_check_rejects_bad_input():
    with pytest.raises(ValueError, match="tolerance"):
        check_results(BASELINE, BASELINE, tolerance=-0.1)
    other_model = [dict(r, model="gpt2") for r in BASELINE]
    with pytest.raises(ValueError, match="baseline is for"):
        check_results(other_model, BASELINE, tolerance=0.1)


def test_load_results_reads_results_and_baselines(tmp_path):
    rows = copy.deepcopy(BASELINE)
    (tmp_path / "e2e_llama4.json").write_text(json.dumps(rows))
    (tmp_path / "e2e_llama4_machine.json").write_text(json.dumps({"cpu_model": "X"}))
    got, meta = load_results(tmp_path / "e2e_llama4.json")
    assert got == rows and meta == {"cpu_model": "X"}
    path = bench.save_baseline(tmp_path / "base.json", rows, {"cores": 2})
    got, meta = load_results(path)
    assert [r["variant"] for r in got] == [r["variant"] for r in rows] and meta == {"cores": 2}
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="neither a results JSON"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_results(tmp_path / "missing.json")


# --------------------------------------------------------------------------- plots and options


def test_pareto_plot_from_several_results(tmp_path):
    pytest.importorskip("matplotlib")
    llama = _run(_row("adacc0.5", ratio=1.1, saved=19.0, budget_mib=19.7), _row("adacc0.7", ratio=1.03, saved=27.0))
    llama += [_row("ac", ratio=1.8, saved=4.5), _row("eager", ratio=1.4, saved=48.0), _row("pt0.1", ratio=1.2, saved=4.0)]
    gpt2 = [dict(r, model="gpt2") for r in llama]
    # A second llama run without compression: its adacc line is drawn next to the first.
    exact = [dict(r, compress="off", step_ratio=r["step_ratio"] * 1.05) for r in llama if r["variant"].startswith("adacc")]
    for i, rows in enumerate((llama, gpt2, exact)):
        (tmp_path / f"r{i}.json").write_text(json.dumps(rows))
    out = tmp_path / "fig.png"
    files = [str(tmp_path / f"r{i}.json") for i in range(3)]
    code = cli.main(["bench", "--plot", *files, "--out", str(out), "--x", "both"])
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="x: unknown axis"):
        plot_pareto([llama], tmp_path / "x.png", x=("time",))


def test_options_are_validated():
    with pytest.raises(ValueError, match="model: unknown model 'bert'"):
        BenchConfig(model="bert")
    with pytest.raises(ValueError, match="budgets: each budget"):
        BenchConfig(budgets=(1.5,))
    with pytest.raises(ValueError, match="rounds: must be at least 1"):
        BenchConfig(rounds=0)
    with pytest.raises(ValueError, match="variants: unknown"):
        bench.select_variants(bench.make_variants([0.5], []), "inductor,adacc0.9")
    with pytest.raises(ValueError, match="budget: must be a fraction"):
        TrainConfig(budget=0.0)
    with pytest.raises(ValueError, match="width: must be a multiple of 4"):
        TrainConfig(width=30)
    with pytest.raises(ValueError, match="grad_clip: must be a positive number or None"):
        TrainConfig(grad_clip=0.0)
    assert TrainConfig(grad_clip=None).grad_clip is None
    with pytest.raises(SystemExit):
        cli.main(["bench", "--budgets", "2"])
    # Other adacc options: validated as torch.compile would, before any run.
    assert cli._parse_options(["compress_sensitive=true", "min_sqnr_db = 30"]) == {
        "compress_sensitive": "true",
        "min_sqnr_db": "30",
    }
    with pytest.raises(ValueError, match="unknown adacc option.*'sqnr'"):
        cli._parse_options(["sqnr=30"])
    with pytest.raises(ValueError, match="min_sqnr_db: expected a number"):
        cli._parse_options(["min_sqnr_db=loud"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        cli._parse_options(["compress_sensitive"])
    with pytest.raises(ValueError, match="adacc train sets 'memory_budget' with --budget"):
        cli._parse_options(["memory_budget=0.3"])
    with pytest.raises(ValueError, match="adacc explain sets 'dump_dir' with --dump-dir"):
        cli._parse_options(["dump_dir=/tmp/d"], "explain")
    with pytest.raises(ValueError, match="adacc train sets 'dump_dir' with --out"):
        cli._parse_options(["dump_dir=/tmp/d"], "train")
    # The benchmark has no dump flag: its adacc variants take dump_dir as an option.
    assert cli._parse_options(["dump_dir=/tmp/d"], "bench") == {"dump_dir": "/tmp/d"}
    with pytest.raises(ValueError, match="adacc bench sets 'compress' with --compress"):
        cli._parse_options(["compress=off"], "bench")
    with pytest.raises(ValueError, match="compress_sensitive"):
        BenchConfig(options={"compress_sensitive": "maybe"})
    with pytest.raises(ValueError, match="options: set compress"):
        TrainConfig(options={"compress": "off"})


def test_cli_choices_match_the_package():
    assert cli._model_names() == sorted(MODELS)
    assert cli._COMPRESS == bench.COMPRESS_CHOICES
    with pytest.raises(ValueError, match="compress: must be one of"):
        BenchConfig(compress="zip")


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("adacc") == "adacc_compiler.cli:main"


def test_wrappers_still_answer():
    for cmd in (
        [sys.executable, "-m", "adacc_compiler.demo", "--help"],
        [sys.executable, str(REPO / "bench" / "bench_e2e.py"), "--help"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert "--budget" in out.stdout


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ci_variants():
    """Compile the CI check's variants once for the passing and the failing run.

    ``bench.prepare_variant`` is wrapped so that the second ``adacc bench``
    of this module reuses the compiled steps and measurements of the first
    (compiling is most of a run's time); ``state["slowdown"]`` makes every
    adacc step do that many steps' work.
    """
    torch._dynamo.reset()
    original = bench.prepare_variant
    cache: dict[str, tuple] = {}
    state = {"slowdown": 1}

    def prepare(v, base, batch, ref, row):
        if v.name not in cache:
            measured = dict(row)
            cache[v.name] = (original(v, base, batch, ref, measured), measured)
        step, measured = cache[v.name]
        row.update(measured)
        if step is None or v.family != "adacc" or state["slowdown"] == 1:
            return step
        factor = state["slowdown"]

        def slowed() -> None:
            for _ in range(factor):
                step()

        return slowed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "prepare_variant", prepare)
        yield state
    torch._dynamo.reset()


def _ci_check(out_dir: Path) -> int:
    return cli.main([*CI_BENCH_ARGS, "--out", str(out_dir), "--check", str(CI_BASELINE), "--tolerance", CI_TOLERANCE])


def test_ci_regression_check_passes_on_this_code(tmp_path, capsys, ci_variants):
    ci_variants["slowdown"] = 1
    code = _ci_check(tmp_path)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "regression check PASSED: 1 adacc variant(s) checked, 0 failure(s)" in out
    # The row carries what the plan expected next to what was measured.
    rows, _ = load_results(tmp_path / "e2e_gpt_2.json")
    (row,) = [r for r in rows if r["variant"] == "adacc0.5"]
    assert math.isfinite(row["plan_overhead_ms"]) and row["plan_overhead_ms"] >= 0.0
    bound = AdaccConfig().min_plan_sqnr_db
    assert row["plan_sqnr_db"] is None or row["plan_sqnr_db"] >= bound - 1e-6


def test_ci_regression_check_fails_on_a_slowed_adacc_step(tmp_path, capsys, ci_variants):
    ci_variants["slowdown"] = 3
    code = _ci_check(tmp_path)
    out = capsys.readouterr().out
    assert code == 1, out
    assert "regression check FAILED" in out
    assert "FAIL adacc0.5: step-time ratio to stock Inductor" in out
    rows, _ = load_results(tmp_path / "e2e_gpt_2.json")
    (row,) = [r for r in rows if r["variant"] == "adacc0.5"]
    assert row["step_ratio"] > 2.0


def test_explain_prints_the_plan_and_writes_dumps(tmp_path, capsys, fresh_dynamo):
    args = ["explain", "--model", "gpt", "--layers", "2", "--width", "64", "--seq", "32", "--no-profile"]
    code = cli.main([*args, "--budget", "0.5", "--dump-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for column in ("tensor", "shape", "dtype", "bytes", "producer", "decision", "est. cost (us)"):
        assert column in out
    assert "recompute" in out and "within it" in out
    (graph_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in ("plan.txt", "plan.json", "memory_timeline.csv", "forward_graph.py", "backward_graph.py"):
        assert (graph_dir / name).is_file(), name

    torch._dynamo.reset()
    code = cli.main([*args, "--budget", "0.01", "--dump-dir", str(tmp_path / "tight")])
    err = capsys.readouterr().err
    assert code == 2
    assert "smallest budget adacc finds feasible" in err


def test_train_writes_table_and_plots(tmp_path, capsys, fresh_dynamo):
    pytest.importorskip("transformers")
    out_dir = tmp_path / "out"
    args = ["train", "--steps", "5", "--layers", "1", "--width", "32", "--seq", "32", "--batch", "2"]
    code = cli.main([*args, "--out", str(out_dir), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "stock Inductor" in out and "adacc (budget 0.5)" in out and "step ratio" in out
    for name in ("summary.json", "losses.csv", "loss_curves.png", "memory_timeline.png"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    ind, ada = summary["runs"]["inductor"], summary["runs"]["adacc"]
    assert ada["saved_bytes"] < ind["saved_bytes"]
    assert ada["saved_bytes"] <= summary["plan"]["budget_bytes"] * 1.02
    # Same weights and batches; adacc only recomputes or (by default) compresses
    # what the backward reads, so the two runs train alike.
    assert ada["final_loss"] == pytest.approx(ind["final_loss"], rel=0.02)
    assert len((out_dir / "losses.csv").read_text().splitlines()) == 1 + 5


def test_check_refuses_a_baseline_of_another_setup(tmp_path):
    path = bench.save_baseline(tmp_path / "b.json", BASELINE, {"config": {"model": "llama", "layers": 4, "width": 128}})
    code = cli.main(["bench", "--model", "llama", "--layers", "4", "--check", str(path), "--out", str(tmp_path)])
    assert code == 2


def test_train_flags_default_to_the_train_config():
    # `adacc train` with no flags must train what TrainConfig() describes (the
    # README's main job), not a copy of its defaults that drifted.
    args = cli.build_parser().parse_args(["train"])
    default = TrainConfig()
    for flag in ("budget", "steps", "layers", "width", "seq", "batch", "lr", "grad_clip", "seed", "out"):
        assert getattr(args, flag) == getattr(default, flag), flag


def test_machine_description_lists_uncommitted_changes():
    d = bench.machine_description()
    if d["git_commit"] is None:
        assert d["git_changed_files"] is None
    else:
        assert isinstance(d["git_changed_files"], list)
        assert all(isinstance(f, str) and f and not f.startswith(" ") for f in d["git_changed_files"])
