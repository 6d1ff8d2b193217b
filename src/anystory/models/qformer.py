"""The QFormer: learned queries that read a CLIP image's tokens (paper Eq. 2 and the router).

AnyStory uses two of them on the same CLIP features: the *subject* QFormer (64 queries)
yields the subject's CLIP condition E_i in the U-Net's text-feature width; the *routing*
QFormer (one query) yields the routing feature R_i that the router matches against the
latent. Each layer: self-attention among queries, cross-attention to the image tokens,
feed-forward; pre-norm residuals (BLIP-2 style).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import FeedForward, MultiHeadCrossAttention


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, image_dim: int, heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadCrossAttention(dim, dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_image = nn.LayerNorm(image_dim)
        self.cross_attn = MultiHeadCrossAttention(dim, image_dim, heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x)
        queries = queries + self.cross_attn(self.norm_cross(queries), self.norm_image(image_tokens))
        return queries + self.ff(self.norm_ff(queries))


class QFormer(nn.Module):
    """Compress (B, T, image_dim) image tokens into (B, num_queries, output_dim)."""

    def __init__(
        self,
        image_dim: int,
        output_dim: int,
        num_queries: int,
        dim: int = 1024,
        depth: int = 4,
        heads: int = 16,
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.layers = nn.ModuleList(QFormerLayer(dim, image_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(image_tokens.shape[0], -1, -1).to(image_tokens.dtype)
        for layer in self.layers:
            queries = layer(queries, image_tokens)
        return self.norm_out(self.proj_out(queries))
