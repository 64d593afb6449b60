"""``python -m adacc_compiler.demo``: the same job as ``adacc train``.

Kept so that existing scripts keep working; the training logic lives in
:mod:`adacc_compiler.train` and the options are those of ``adacc train``
(``python -m adacc_compiler.demo --help``).
"""

from __future__ import annotations

import sys

from adacc_compiler.cli import main as _cli_main

__all__ = ["main", "stdlib_corpus"]


def stdlib_corpus(max_bytes: int = 2_000_000):
    """See :func:`adacc_compiler.train.stdlib_corpus`."""
    from adacc_compiler.train import stdlib_corpus as _corpus

    return _corpus(max_bytes)


def main(argv: list[str] | None = None) -> int:
    return _cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
