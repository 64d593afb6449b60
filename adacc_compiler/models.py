"""Small, randomly initialised language models for the demo, the CLI and the tests.

Nothing is downloaded: each model is built from a config with random weights
under a fixed seed, so two calls with the same arguments give identical
weights and an identical batch.

* :class:`GPT` -- a plain-PyTorch GPT (no dependency beyond torch).
* :func:`llama`, :func:`gpt2` -- Hugging Face ``LlamaForCausalLM`` and
  ``GPT2LMHeadModel`` from small configs (need ``transformers``, which the
  ``dev`` extra installs).
* :func:`make_model` -- ``(model, batch)`` by name, for the benchmarks:
  ``model(**batch)`` returns the loss (plain GPT) or an output whose ``.loss``
  is the loss (Hugging Face); :func:`loss_of` accepts either.

Attention in the Hugging Face models is the eager implementation by default:
plain ``matmul -> softmax -> matmul``, which Dynamo traces into ordinary aten
ops without graph breaks on CPU, so the ``batch x heads x seq x seq``
attention probabilities are a real saved activation for a planner to act on
(a fused SDPA kernel's backward would be an opaque op). Pass ``attn="sdpa"``
for the fused path.

Dropout probabilities are 0 so that gradients are deterministic and can be
compared across variants (eager, activation checkpointing, compiled).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "GPT",
    "Block",
    "llama",
    "gpt2",
    "gpt",
    "llama_config",
    "make_model",
    "loss_of",
    "enable_activation_checkpointing",
    "MODELS",
    "BATCH",
    "SEQ",
    "VOCAB",
    "HIDDEN",
]

VOCAB = 512
BATCH = 4
SEQ = 128
HIDDEN = 256


# --------------------------------------------------------------------------- plain GPT


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT: token + position embeddings, pre-norm blocks, tied head, cross-entropy.

    ``checkpoint_blocks = True`` runs every block under non-reentrant
    ``torch.utils.checkpoint`` (the benchmarks' activation-checkpointing
    variant); it is off by default.
    """

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, layers: int = 6, seq: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.checkpoint_blocks = False
        # GPT-2's init: small embeddings keep the tied head's first logits sane.
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            if self.checkpoint_blocks:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.ln(x) @ self.tok.weight.t()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


# --------------------------------------------------------------------------- factories


def _ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)


def _hf_batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    input_ids = _ids(vocab, batch, seq, seed)
    # labels = input_ids: the HF causal-LM loss shifts them internally.
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError(
            "the Hugging Face models need `transformers`; install it with "
            "`pip install transformers` or `pip install -e '.[dev]'`"
        ) from err
    return transformers


def _llama_mlp_width(width: int) -> int:
    # Llama's 8/3 expansion, rounded up to a multiple of 16 (688 for width 256).
    return 16 * math.ceil(width * 8 / 3 / 16)


def llama_config(
    *,
    layers: int,
    width: int = HIDDEN,
    vocab: int = VOCAB,
    heads: int = 4,
    kv_heads: int = 2,
    mlp: int | None = None,
    max_seq: int = 256,
    attn: str = "eager",
) -> Any:
    """A ``LlamaConfig`` (GQA, untied embeddings, no KV cache, no dropout).

    ``mlp`` defaults to Llama's 8/3 of ``width`` rounded up to a multiple of 16.
    """
    transformers = _import_transformers()
    if width % heads:
        raise ValueError(f"width: must be a multiple of heads={heads}, got {width}")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_llama_mlp_width(width) if mlp is None else mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        max_position_embeddings=max(256, max_seq),
        use_cache=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    return cfg


def llama(
    layers: int = 4,
    *,
    batch: int = BATCH,
    seq: int = SEQ,
    seed: int = 0,
    width: int = HIDDEN,
    attn: str = "eager",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small Llama (GQA: 4 query heads, 2 KV heads; width 256, MLP 688, vocab 512) and a batch."""
    transformers = _import_transformers()
    cfg = llama_config(layers=layers, width=width, max_seq=seq, attn=attn)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().train()
    return model, _hf_batch(VOCAB, batch, seq, seed)


def gpt2(
    layers: int = 4,
    *,
    batch: int = BATCH,
    seq: int = SEQ,
    seed: int = 0,
    width: int = HIDDEN,
    attn: str = "eager",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small GPT-2 (4 heads, width 256, vocab 512, dropout off) and a batch."""
    transformers = _import_transformers()
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=max(256, seq),
        n_embd=width,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).float().train()
    # HF cannot infer the loss from the class name "GPT2LMHeadModel" and then
    # logs a warning inside forward, which is a Dynamo graph break.
    model.loss_type = "ForCausalLM"
    return model, _hf_batch(VOCAB, batch, seq, seed)


def gpt(
    layers: int = 4,
    *,
    batch: int = BATCH,
    seq: int = SEQ,
    seed: int = 0,
    width: int = HIDDEN,
    attn: str = "eager",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The plain-PyTorch :class:`GPT` (4 heads, vocab 512) and a batch; needs no ``transformers``."""
    if attn != "eager":
        raise ValueError(f"attn: the plain GPT has only attn='eager', got {attn!r}")
    torch.manual_seed(seed)
    model = GPT(vocab=VOCAB, dim=width, heads=4, layers=layers, seq=seq).float().train()
    return model, {"idx": _ids(VOCAB, batch, seq, seed)}


MODELS: dict[str, Callable[..., tuple[nn.Module, dict[str, torch.Tensor]]]] = {
    "llama": llama,
    "gpt2": gpt2,
    "gpt": gpt,
}


def make_model(name: str, layers: int = 4, **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(model, batch)`` for ``name`` in :data:`MODELS`; ``loss_of(model(**batch))`` is the loss."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"model: unknown model {name!r}; choose from {sorted(MODELS)}") from None
    if layers < 1:
        raise ValueError(f"layers: must be at least 1, got {layers}")
    return factory(layers, **kwargs)


def loss_of(out: Any) -> torch.Tensor:
    """The loss of a model output: the tensor itself, or a Hugging Face output's ``.loss``."""
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if loss is None:
        raise TypeError(f"model output of type {type(out).__name__} is neither a tensor nor has a .loss")
    return loss


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every layer (non-reentrant) of a model from :data:`MODELS`, in place."""
    if isinstance(model, GPT):
        model.checkpoint_blocks = True
        return model
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):  # deprecated in 5.x, the only name in 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"do not know how to checkpoint the layers of {type(model).__name__}")
    return model
