#!/usr/bin/env python
"""``adacc bench`` with its results in ``bench/results/`` by default.

    python bench/bench_e2e.py --model llama --layers 4 --budgets 0.7 0.6 0.5 0.45 0.4 \
        --pt-budgets 0.7 0.5 0.3 0.1 --rounds 10

is ``adacc bench ... --out bench/results``; every option of ``adacc bench
--help`` applies. The logic lives in :mod:`adacc_compiler.bench`; see
bench/README.md for the columns and the method.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adacc_compiler.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(REPO / "bench" / "results")]
    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
