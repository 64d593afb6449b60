"""Small, randomly initialised Hugging Face language models for the benchmarks.

Nothing is downloaded: each model is built from a config with random weights
under a fixed seed, so two calls with the same arguments give identical
weights and an identical batch.  Sizes are chosen so that one eager fp32
forward+backward step takes well under a second on 2 CPU cores.

Attention: we use ``attn_implementation="eager"``.  The eager path is plain
``matmul -> softmax -> matmul`` which Dynamo/AOT trace into ordinary aten ops,
so (a) the attention probabilities appear as a real, large saved activation
(batch x heads x seq x seq) that a retain/recompute planner can act on, and
(b) there is no fused SDPA kernel whose backward is an opaque fallback op with
CPU-specific saved outputs (logsumexp etc.).  It also traces without graph
breaks on CPU.  Pass ``attn="sdpa"`` to get the fused path instead.

Dropout probabilities are 0 so that gradients are deterministic and can be
compared across variants (eager, activation checkpointing, compiled).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["llama", "gpt2", "make_model", "MODELS", "BATCH", "SEQ", "VOCAB"]

VOCAB = 512
BATCH = 4
SEQ = 128
HIDDEN = 256


def _batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)
    # labels = input_ids: the HF causal-LM loss shifts them internally.
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def llama(
    layers: int = 4,
    *,
    batch: int = BATCH,
    seq: int = SEQ,
    seed: int = 0,
    attn: str = "eager",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small Llama (GQA: 4 query heads, 2 KV heads) and a batch for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        max_position_embeddings=256,
        use_cache=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().train()
    return model, _batch(VOCAB, batch, seq, seed)


def gpt2(
    layers: int = 4,
    *,
    batch: int = BATCH,
    seq: int = SEQ,
    seed: int = 0,
    attn: str = "eager",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small GPT-2 (4 heads, width 128, dropout off) and a batch for it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=256,
        n_embd=HIDDEN,
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
    model = GPT2LMHeadModel(cfg).float().train()
    # HF cannot infer the loss from the class name "GPT2LMHeadModel" and then
    # logs a warning inside forward, which is a Dynamo graph break.
    model.loss_type = "ForCausalLM"
    return model, _batch(VOCAB, batch, seq, seed)


MODELS: dict[str, Callable[..., tuple[nn.Module, dict[str, torch.Tensor]]]] = {
    "llama": llama,
    "gpt2": gpt2,
}


def make_model(
    name: str, layers: int = 4, **kwargs
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(model, batch)`` for ``name`` in :data:`MODELS`; ``model(**batch).loss`` is the loss."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
    return factory(layers, **kwargs)
