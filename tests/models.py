"""Small models the end-to-end tests compile (random init, CPU-sized)."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class MLP(nn.Module):
    """A deep GELU MLP: enough layers that tight budgets have room to recompute."""

    def __init__(self, width: int = 64, depth: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x).pow(2).mean()


from adacc_compiler.models import GPT  # noqa: E402,F401  (the demo's model, tested as is)


def hf_llama(layers: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).train()


def hf_gpt2(layers: int = 6):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=layers, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).train()
    model.loss_type = "ForCausalLM"
    return model
