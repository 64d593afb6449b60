"""``bench/bench_train.py --replot``: the seeds' plot drawn again from a run's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import bench_scripts


@pytest.fixture(scope="module")
def bench_train():
    return bench_scripts.load("bench_train")


def _run_dir(tmp_path: Path, seeds: list[int]) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps({"budget": 0.25, "seeds": seeds, "options": {"min_plan_sqnr_db": "30"}})
    )
    for seed in seeds:
        d = tmp_path / f"seed_{seed}"
        d.mkdir()
        rows = ["step,loss_inductor,loss_adacc,step_s_inductor,step_s_adacc"]
        rows += [f"{i},{5.0 - 0.01 * i},{5.0 - 0.01 * i + 0.001 * seed},0.05,0.05" for i in range(40)]
        (d / "losses.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_replot_draws_the_seeds_plot_from_the_run_files(tmp_path, bench_train):
    run = _run_dir(tmp_path, [0, 3])
    assert bench_train.main(["--replot", str(run)]) == 0
    png = run / "seeds.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replot_names_what_is_missing(tmp_path, bench_train):
    with pytest.raises(ValueError, match="holds no config.json"):
        bench_train.replot(tmp_path)
    run = _run_dir(tmp_path, [0])
    (run / "seed_0" / "losses.csv").unlink()
    with pytest.raises(ValueError, match=r"seed_0/losses.csv is missing \(config.json lists seed 0\)"):
        bench_train.replot(run)


def test_the_title_names_the_budget_and_every_option(bench_train):
    assert bench_train._title(0.25, {"a": "1", "b": "x"}) == "adacc at budget 0.25 (a=1, b=x) vs stock Inductor"
    assert bench_train._title(0.5, {}) == "adacc at budget 0.5 (default options) vs stock Inductor"
    assert bench_train._title(1.0, {}, "off") == "adacc at budget 1.0 (compress=off) vs stock Inductor"
