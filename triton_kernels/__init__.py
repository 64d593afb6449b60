"""Activation codecs (installed as ``adacc_compiler.triton_kernels``).

Each codec lives in its own file with its Triton kernels, a plain-PyTorch
reference, its ``torch.library`` registration and its compressed size. The
registry maps codec names to all of that. No codec is registered yet: the
planner's choices are retain and recompute.
"""

from adacc_compiler.triton_kernels.registry import CODECS, Codec, get_codec, register_codec

__all__ = ["CODECS", "Codec", "get_codec", "register_codec"]
