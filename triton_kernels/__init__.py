"""Activation codecs (installed as ``adacc_compiler.triton_kernels``).

Each codec lives in its own file with its Triton kernels, a plain-PyTorch
reference, its ``torch.library`` registration and its compressed size. The
registry maps codec names to all of that. Importing this package registers
every codec below (and defines their ``adacc::*`` ops).

Codecs: ``int12_token``, ``int8_token``, ``int8_group``, ``int4_group`` (lossy, float inputs),
``bf16`` (lossy, float32 inputs) and
``bool1`` (lossless, bool inputs).
"""

from adacc_compiler.triton_kernels.registry import CODECS, Codec, get_codec, register_codec

# Imported for their registration side effect.
from adacc_compiler.triton_kernels import bf16, bool1, int4_group, int8_group, int8_token, int12_token  # noqa: E402,F401

__all__ = ["CODECS", "Codec", "get_codec", "register_codec"]
