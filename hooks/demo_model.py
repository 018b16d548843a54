"""A small GPT-style transformer and a synthetic token stream, for the demo and benchmarks.

Random weights and generated data: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 2048
    context: int = 64
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        attended: torch.Tensor = self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        x = x + attended
        mixed: torch.Tensor = self.mlp(self.ln2(x))
        return x + mixed


class TinyGPT(nn.Module):
    """Decoder-only transformer: token + position embeddings, pre-LN blocks, tied head."""

    causal_mask: torch.Tensor  # a buffer

    def __init__(self, cfg: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        mask = torch.triu(torch.full((cfg.context, cfg.context), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        # GPT-2's init scale: unit-variance tied embeddings would start the loss near 30.
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            x = block(x, mask)
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits


def synthetic_batches(cfg: GPTConfig, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches of a learnable pattern: each sequence counts
    upwards from a random start, so the loss falls quickly from log(vocab)."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.arange(cfg.context + 1)
    while True:
        start = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=gen)
        seq = (start + steps) % cfg.vocab_size
        yield seq[:, :-1], seq[:, 1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
