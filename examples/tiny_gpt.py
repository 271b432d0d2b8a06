"""A small GPT-style model and a synthetic corpus, for the demo, benchmarks and tests.

The corpus is generated (sums like ``37+5=42``), so nothing is downloaded and
every run with the same seed sees the same batches; the model learns it in a
minute on a CPU, so the loss curve is worth looking at.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "TinyGPT", "ArithmeticCorpus", "warmup_cosine"]

VOCAB = "0123456789+=\n "


@dataclass
class GPTConfig:
    vocab_size: int = len(VOCAB)
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, dropout=cfg.dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer: token + position embeddings, pre-LN blocks, tied head."""

    def __init__(self, cfg: GPTConfig | None = None):
        super().__init__()
        cfg = cfg or GPTConfig()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        mask = torch.triu(torch.full((cfg.block_size, cfg.block_size), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = self.mask[:t, :t]
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def param_groups(self, weight_decay: float = 0.1) -> list[dict]:
        """Two named groups, the usual way: decay matrices, not norms/biases/embeddings."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 and "tok" not in name and "pos" not in name else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]


class ArithmeticCorpus:
    """Endless batches of ``a+b=c`` lines, deterministic for a seed."""

    def __init__(self, block_size: int = 64, seed: int = 0, size: int = 200_000):
        rng = random.Random(seed)
        lines = []
        total = 0
        while total < size:
            a, b = rng.randrange(100), rng.randrange(100)
            line = f"{a}+{b}={a + b}\n"
            lines.append(line)
            total += len(line)
        text = "".join(lines)
        self.data = torch.tensor([VOCAB.index(c) for c in text], dtype=torch.long)
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.block_size - 1, (batch_size,), generator=self.generator)
        x = torch.stack([self.data[s : s + self.block_size] for s in starts.tolist()])
        y = torch.stack([self.data[s + 1 : s + 1 + self.block_size] for s in starts.tolist()])
        return x, y

    def skip(self, batches: int, batch_size: int) -> None:
        """Advance the stream as if ``batches`` batches had been drawn (skip data around a spike)."""
        for _ in range(batches):
            torch.randint(0, len(self.data) - self.block_size - 1, (batch_size,), generator=self.generator)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float = 0.1):
    """The usual LambdaLR schedule: linear warmup, cosine decay to ``floor`` × peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
