"""Codec registry: codec name -> kernels, reference, op and size model.

The contract every codec keeps (the planner and the rewrite rely on it):

* ``compress_op`` is a ``torch.library`` op ``adacc::<name>_compress`` taking
  ``(Tensor x, bool stochastic=False, int seed=0)`` and returning a tuple of
  exactly ``num_payloads`` tensors whose shapes depend only on ``x.shape``
  (static sizes: the forward saves these payloads for the backward). A torch
  schema has no one-element tuple: a codec with a single payload returns
  ``Tensor[]``, a one-element list, so ``result[i]`` and ``*result`` read the
  same for every codec.
* ``decompress_op`` is ``adacc::<name>_decompress`` taking
  ``(payload_0, ..., payload_{k-1}, SymInt[] shape, ScalarType dtype)`` and
  returning a contiguous tensor of ``shape`` and ``dtype``.
* Both ops have fake implementations (shapes and strides exact), a CPU kernel
  and, where triton is usable, a CUDA kernel written in Triton.
* ``reference_compress`` / ``reference_decompress`` are plain-PyTorch
  definitions with the same signatures; tests hold the ops to them.
* ``compressed_nbytes(shape, dtype)`` is the exact byte size of the payloads.
* ``supports(shape, dtype)`` says whether the codec applies to a tensor.
* Non-finite values never decode to finite numbers: a lossless codec keeps
  them exactly, a lossy codec makes at least the affected group non-finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["Codec", "CODECS", "register_codec", "get_codec", "roundtrip"]


@dataclass(frozen=True)
class Codec:
    """One activation codec (see the module docstring for the contract)."""

    name: str
    lossless: bool
    num_payloads: int
    compress_op: Callable[..., tuple[torch.Tensor, ...]]
    decompress_op: Callable[..., torch.Tensor]
    reference_compress: Callable[..., tuple[torch.Tensor, ...]]
    reference_decompress: Callable[..., torch.Tensor]
    compressed_nbytes: Callable[[Sequence[int], torch.dtype], int]
    supports: Callable[[Sequence[int], torch.dtype], bool]
    description: str = ""

    def __post_init__(self) -> None:
        assert self.num_payloads >= 1, self.name


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is already registered")
    CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r}; registered codecs: {', '.join(sorted(CODECS)) or '(none)'}"
        ) from None


def roundtrip(codec: Codec, x: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
    """``decompress(compress(x))`` through the ops (or the reference)."""
    comp = codec.reference_compress if reference else codec.compress_op
    dec = codec.reference_decompress if reference else codec.decompress_op
    payload = comp(x)
    return dec(*payload, list(x.shape), x.dtype)
