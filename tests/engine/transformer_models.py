"""A BERT-shaped encoder written out by hand (no download, no transformers needed), for int8 tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EncoderLayer(nn.Module):
    """Post-LayerNorm BERT layer: self-attention and a GELU feed-forward, six Linears."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.output_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        head = hidden // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, head).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = self.attention_norm(x + self.attention_output(context))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class TinyBert(nn.Module):
    """Token ids (batch, length) -> hidden states (batch, length, hidden)."""

    def __init__(
        self, vocab: int = 500, hidden: int = 128, layers: int = 4, heads: int = 4, max_length: int = 64
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_length, hidden)
        self.embedding_norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, 4 * hidden) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embedding_norm(self.tokens(ids) + self.positions(positions))
        for layer in self.layers:
            x = layer(x)
        return x


def tiny_bert(seed: int = 0, outliers: bool = True, **sizes: int) -> TinyBert:
    """A seeded TinyBert; with `outliers`, four hidden channels of the first two layers' outputs are
    scaled by 50, the activation outliers real transformers have (Dettmers et al. 2022)."""
    torch.manual_seed(seed)
    model = TinyBert(**sizes).eval()
    if outliers:
        with torch.no_grad():
            for layer in model.layers[:2]:
                layer.output.weight[:4] *= 50
                layer.output.bias[:4] *= 50
    return model


def token_ids(samples: int, length: int = 32, vocab: int = 500, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (samples, length), generator=generator)
