"""Small transformer building blocks shared by the QFormers and the router."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadCrossAttention(nn.Module):
    """Queries attend to a context with torch's SDPA; an optional boolean mask says who sees what.

    Its projections are deliberately not named `to_q`/`to_k`/`to_out`, so that LoRA loaders
    matching the U-Net's attention by suffix never touch AnyStory's own modules.
    """

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=False)
        self.key_value = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, Q, dim); context: (B, K, context_dim); mask: (B, Q, K) bool, True = visible."""
        q = self._split(self.query(x))
        k, v = (self._split(t) for t in self.key_value(context).chunk(2, dim=-1))
        attn_mask = None if mask is None else mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(out.transpose(1, 2).flatten(2))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))
