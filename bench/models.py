"""The benchmark models, kept importable as ``models`` from scripts under ``bench/``.

They live in :mod:`adacc_compiler.models` so that the installed ``adacc``
command has them too; see there for what each model is.
"""

from adacc_compiler.models import BATCH, MODELS, SEQ, VOCAB, gpt, gpt2, llama, make_model  # noqa: F401

__all__ = ["llama", "gpt2", "gpt", "make_model", "MODELS", "BATCH", "SEQ", "VOCAB"]
