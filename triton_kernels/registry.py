"""Codec registry: codec name -> kernels, reference, op and size model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Codec", "CODECS", "register_codec", "get_codec"]


@dataclass(frozen=True)
class Codec:
    """One activation codec.

    ``compress``/``decompress`` are the registered ops; ``reference_*`` the
    plain-PyTorch definitions they are tested against; ``compressed_nbytes``
    gives the stored size for a shape and dtype; ``lossless`` says whether the
    round trip is exact.
    """

    name: str
    compress: Callable[..., object]
    decompress: Callable[..., torch.Tensor]
    reference_compress: Callable[..., object]
    reference_decompress: Callable[..., torch.Tensor]
    compressed_nbytes: Callable[[tuple[int, ...], torch.dtype], int]
    lossless: bool


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
