"""The decoupled instance-aware router (paper §3.3).

At every cross-attention layer it decides, for each latent position, which of the N
subjects (or the background, index N) the position belongs to:

1. coarse map: projected inner product of the routing features R with the latent Z
   ("Linear A" on R, "Linear B" on Z), softmax over the N + 1 entries;
2. refinement: a one-layer Mask2Former-style decoder; each routing token attends only
   to the positions the coarse map routed to it, then a feed-forward update;
3. refined map: projected inner product again.

The hard route sigma(M) is the one-hot argmax; training passes gradients through it
with the straight-through Gumbel-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FeedForward, MultiHeadCrossAttention


@dataclass
class RouterLogits:
    """Routing logits of one layer, (B, N + 1, hw) each; softmax over dim 1 gives the maps."""

    coarse: torch.Tensor
    refined: torch.Tensor


class RouterLayer(nn.Module):
    def __init__(self, routing_dim: int, hidden_dim: int, dim: int = 256, heads: int = 4, context_layers: int = 0):
        super().__init__()
        self.latent_context = LatentContext(hidden_dim, context_layers) if context_layers else None
        self.coarse_route = nn.Linear(routing_dim, dim)  # Linear A
        self.coarse_latent = nn.Linear(hidden_dim, dim)  # Linear B
        self.norm_attn = nn.LayerNorm(dim)
        self.masked_attn = MultiHeadCrossAttention(dim, dim, heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.refined_route = nn.Linear(dim, dim)
        self.refined_latent = nn.Linear(hidden_dim, dim)

    def forward(
        self, routing: torch.Tensor, latent: torch.Tensor, valid: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> RouterLogits:
        """routing: (B, N+1, routing_dim); latent: (B, hw, hidden_dim) on a `grid` (h, w)
        (needed with context layers only); valid: (B, N+1) bool."""
        if self.latent_context is not None:
            if grid is None:
                raise ValueError("a router with context layers needs the latent's grid (h, w)")
            latent = torch.where(_several_subjects(routing, valid), self.latent_context(latent, grid), latent)
        route = self.coarse_route(routing)
        latent_key = self.coarse_latent(latent)
        coarse = _masked(_scaled_product(route, latent_key), valid)
        visible = _routed_positions(coarse)
        route = route + self.masked_attn(self.norm_attn(route), latent_key, visible)
        route = route + self.ff(self.norm_ff(route))
        refined = _scaled_product(self.refined_route(route), self.refined_latent(latent))
        return RouterLogits(coarse=coarse, refined=_masked(refined, valid))


class LatentContext(nn.Module):
    """Deviation, off by default (`AnyStoryAdapter`'s `router_context`): a residual stack
    of 3 x 3 convolutions over Z^l before Linear A/B see it, so that each position's
    routing logit can read its neighbourhood. The paper's router scores each position
    from its own feature alone; in the mini U-Net those features tell a subject's colour
    but not its shape (`python -m anystory.mini.diagnostics --probe router`: at the 8 x 8
    layers colour 0.95-1.00, shape 0.18-0.42, chance 0.2), so subjects of one colour are
    routed as one. The last convolution starts at zero: the layer starts as the paper's.

    It is used only where a sample has two or more subjects: a single subject has no
    neighbour to be told apart from, and with the context on there too single-subject
    fidelity fell from 0.800 to 0.745 (2500 stage-2 steps; docs/mini-world-training.md)."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        convs = [nn.Conv2d(dim, dim, 3, padding=1) for _ in range(layers)]
        nn.init.zeros_(convs[-1].weight)
        nn.init.zeros_(convs[-1].bias)
        self.convs = nn.ModuleList(convs)

    def forward(self, latent: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = latent.transpose(1, 2).unflatten(2, grid)
        for i, conv in enumerate(self.convs):
            x = conv(x) if i == len(self.convs) - 1 else F.silu(conv(x))
        return latent + x.flatten(2).transpose(1, 2)


def _several_subjects(routing: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, 1) bool: whether a sample routes two or more subjects (its background entry
    aside), the only case where `LatentContext` is used."""
    count = routing.new_full(routing.shape[:1], routing.shape[1] - 1) if valid is None else valid[:, :-1].sum(1)
    return (count >= 2)[:, None, None]


def _scaled_product(route: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    return route @ latent.transpose(1, 2) * route.shape[-1] ** -0.5


def _masked(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Padding entries (absent subjects in a batch) can never win a position."""
    return logits if valid is None else logits.masked_fill(~valid[..., None], float("-inf"))


def _routed_positions(coarse: torch.Tensor) -> torch.Tensor:
    """(B, N+1, hw) bool: which positions each routing token may attend to.

    A token that received no position attends everywhere, as in Mask2Former, so that
    its attention is never empty.
    """
    visible = F.one_hot(coarse.argmax(dim=1), coarse.shape[1]).transpose(1, 2).bool()
    return visible | ~visible.any(dim=-1, keepdim=True)


def hard_route(logits: torch.Tensor, gumbel_tau: float | None = None) -> torch.Tensor:
    """sigma(M): one-hot over dim 1. With `gumbel_tau`, the straight-through Gumbel-softmax
    sample, whose forward value is one-hot and whose gradient is the soft sample's."""
    if gumbel_tau is not None:
        return F.gumbel_softmax(logits, tau=gumbel_tau, hard=True, dim=1)
    return F.one_hot(logits.argmax(dim=1), logits.shape[1]).transpose(1, 2).to(logits.dtype)
