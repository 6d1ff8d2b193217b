"""Routed attention processors: where AnyStory's conditions enter the U-Net.

Two diffusers attention processors, one pair per transformer block l:

- `RoutedCrossAttnProcessor` replaces `attn2` (Eq. 5): text cross-attention plus, at each
  position, eta times the attention to the CLIP tokens of the subject (or background)
  the router sends it to. It also runs the router and stores the layer's hard route.
- `RoutedReferenceAttnProcessor` replaces `attn1` (Eqs. 6-8): self-attention whose keys
  and values are extended with the ReferenceNet tokens of the subject that the previous
  layer's route assigns to each position; background positions see only their own.

Hard routing sends each query to exactly one subject's reference tokens, so the
reference attention groups queries per route and every attention call stays mask-free
(no materialised bias, fast kernels).
With no state (no subjects), both delegate to the processor they replaced, so the
U-Net computes exactly what it did before.
"""

from __future__ import annotations

import itertools

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .conditioning import AnyStoryState, RecordedMaps
from .router import hard_route
from .topology import grid_size

SDPA = F.scaled_dot_product_attention


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, heads * D) -> (..., heads, L, D)"""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, D) -> (B, L, heads * D)"""
    return x.transpose(1, 2).flatten(2)


def attend_by_route(
    query: torch.Tensor, route: torch.Tensor, attend: Callable[[int, int, torch.Tensor], torch.Tensor],
    width: int | None = None,
) -> torch.Tensor:
    """Group query positions by their route and attend each group with `attend(b, i, q)`.

    query: (B, H, L, D); route: (B, L) ints; width: the values' D when it is not the
    query's. Every position gets exactly one group.
    """
    out = query.new_empty(*query.shape[:-1], width or query.shape[-1])
    for b in range(query.shape[0]):
        routes = route[b].unique()
        if routes.numel() == 1:
            out[b] = attend(b, int(routes), query[b])
            continue
        for i in routes.tolist():
            index = (route[b] == i).nonzero().squeeze(1)
            out[b, :, index] = attend(b, i, query[b, :, index])
    return out


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ref_key: torch.Tensor,
    ref_value: torch.Tensor,
    route: torch.Tensor | None,
    shift: float = 0.0,
    valid: torch.Tensor | None = None,
    ref_query: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eqs. 6-8. query/key/value: (B, H, L, D); ref_key/ref_value: (B, N, H, S, D);
    route: (B, L) in [0, N] (N = background) or None (every subject everywhere);
    shift: gamma, added to the logits of reference keys; valid: (B, N) bool;
    ref_query: (B, H, L, D) queries for the reference keys only (the adapter's
    `reference_query` deviation), None for the paper's one Q for all keys."""
    batch, num_subjects = query.shape[0], ref_key.shape[1]
    ref_key, ref_value = ref_key.expand(batch, -1, -1, -1, -1), ref_value.expand(batch, -1, -1, -1, -1)
    scale = None
    if ref_query is not None:
        query, key, ref_key, scale = _separate_reference_queries(query, ref_query, key, ref_key)
    if route is None:
        keys = torch.cat([key, ref_key.transpose(1, 2).flatten(2, 3)], dim=2)
        values = torch.cat([value, ref_value.transpose(1, 2).flatten(2, 3)], dim=2)
        return SDPA(query, keys, values, attn_mask=_reference_bias(key, ref_key, shift, valid), scale=scale)
    bias = _reference_bias(key[:1], ref_key[:1, :1], shift, None)

    def attend(b: int, i: int, q: torch.Tensor) -> torch.Tensor:
        # 4-D inputs (a batch of one): 3-D ones send CPU SDPA to its slow math kernel
        if i == num_subjects:
            return SDPA(q[None], key[b, None], value[b, None], scale=scale)[0]
        keys = torch.cat([key[b], ref_key[b, i]], dim=1)[None]
        values = torch.cat([value[b], ref_value[b, i]], dim=1)[None]
        return SDPA(q[None], keys, values, attn_mask=bias, scale=scale)[0]

    return attend_by_route(query, route, attend, value.shape[-1])


def _separate_reference_queries(query, ref_query, key, ref_key):
    """One softmax over own and reference keys, with Q on own keys and Q~ on reference
    keys, in the same single attention call: queries become [Q, Q~], own keys [K, 0] and
    reference keys [0, K~], so every logit is Q.K or Q~.K~, scaled by the original
    1/sqrt(D) rather than the stacked width's."""
    scale = query.shape[-1] ** -0.5
    stacked_query = torch.cat([query, ref_query], dim=-1)
    own_key = torch.cat([key, torch.zeros_like(key)], dim=-1)
    stacked_ref_key = torch.cat([torch.zeros_like(ref_key), ref_key], dim=-1)
    return stacked_query, own_key, stacked_ref_key, scale


def _reference_bias(key, ref_key, shift: float, valid) -> torch.Tensor | None:
    """Per-key additive bias (B, 1, 1, L + N*S): 0 on own keys, gamma on reference keys,
    -inf on padded subjects. A broadcast vector, never a (queries x keys) matrix."""
    if shift == 0.0 and valid is None:
        return None
    batch, num_subjects, _, ref_len, _ = ref_key.shape
    ref_bias = key.new_full((batch, num_subjects, ref_len), shift)
    if valid is not None:
        ref_bias = ref_bias.masked_fill(~valid[..., None], float("-inf"))
    own_bias = key.new_zeros(batch, key.shape[2])
    return torch.cat([own_bias, ref_bias.flatten(1)], dim=1)[:, None, None]


def subject_attention(
    query: torch.Tensor,
    subject_key: torch.Tensor,
    subject_value: torch.Tensor,
    sigma: torch.Tensor | None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sum over i of sigma(M_i) * Attn(Q, E_i W_k, E_i W_v) of Eq. 5.

    query: (B, H, L, D); subject_key/value: (B, N+1, H, T, D), entry N = background;
    sigma: (B, N+1, L) hard routes (straight-through in training), or None (no router:
    every subject everywhere, the background nowhere); valid: (B, N) bool.

    Every entry is attended densely and weighted: with T (64) keys per entry this costs
    (N+1) * T keys per query, small beside self-attention's L, and it is what the
    straight-through gradient of sigma needs anyway (one path for training and inference).
    """
    batch, entries = subject_key.shape[:2]
    if sigma is None:
        weight = torch.ones(batch, entries, 1, device=query.device, dtype=query.dtype)
        weight[:, -1] = 0
        if valid is not None:
            weight[:, :-1] *= valid[..., None].to(query.dtype)
    else:
        weight = sigma.to(query.dtype)
    heads = query.shape[1]
    # entries folded into the head axis: one 4-D attention call, eligible for fused kernels
    per_entry = SDPA(query.repeat(1, entries, 1, 1), subject_key.flatten(1, 2), subject_value.flatten(1, 2))
    per_entry = per_entry.unflatten(1, (entries, heads))
    return torch.einsum("bnhld,bnl->bhld", per_entry, weight.expand(-1, -1, query.shape[2]))


class _RoutedProcessor(nn.Module):
    """Shared plumbing: the layer's trainable parts and the processor it replaced."""

    def __init__(self, layer: int, parts: nn.Module, original):
        super().__init__()
        self.layer = layer
        self.parts = parts
        self._original = [original]  # a list, so an nn.Module original is not re-registered

    @property
    def original(self):
        return self._original[0]

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        anystory: AnyStoryState | None = None,
    ) -> torch.Tensor:
        """diffusers' processor call; `anystory` arrives through `cross_attention_kwargs`
        (defined on `__call__` itself so that diffusers' signature check lets it through)."""
        if anystory is None or not anystory.active or not self._applies():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self._check_supported(attn, hidden_states)
        return self._routed(attn, hidden_states, encoder_hidden_states, attention_mask, anystory)

    def _applies(self) -> bool:
        return True

    @staticmethod
    def _project(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor):
        heads = attn.heads
        query = split_heads(attn.to_q(hidden_states), heads)
        key = split_heads(attn.to_k(context), heads)
        value = split_heads(attn.to_v(context), heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value

    @staticmethod
    def _output(attn: Attention, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = attn.to_out[1](attn.to_out[0](merge_heads(out)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _check_supported(attn: Attention, hidden_states: torch.Tensor) -> None:
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError(
                "AnyStory's routed attention supports transformer-block attention on (B, L, C) tokens "
                "(SDXL's); this attention uses spatial/group norm or 4-D inputs"
            )


class RoutedCrossAttnProcessor(_RoutedProcessor):
    """attn2 of layer l: routing plus route-guided CLIP injection (Eq. 5)."""

    def _routed(self, attn, hidden_states, encoder_hidden_states, attention_mask, anystory: AnyStoryState):
        state, batch = anystory, hidden_states.shape[0]
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = self._project(attn, hidden_states, context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        text = SDPA(query, key, value, attn_mask=attention_mask)

        sigma = self._route(state, hidden_states)
        subject_key, subject_value = state.projected(("subject", self.layer), lambda: self._subject_kv(state))
        if attn.norm_k is not None:
            subject_key = attn.norm_k(subject_key)
        subject = subject_attention(query, subject_key, subject_value, sigma, state.subject_valid)
        return self._output(attn, text + state.subject_scale * subject, hidden_states)

    def _subject_kv(self, state: AnyStoryState) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = state.subject_tokens
        heads = self.parts.heads
        return split_heads(self.parts.subject_k(tokens), heads), split_heads(self.parts.subject_v(tokens), heads)

    def _route(self, state: AnyStoryState, latent: torch.Tensor) -> torch.Tensor | None:
        """sigma(M^l), (B, N+1, L), stored for the next layer's reference attention."""
        grid = grid_size(latent.shape[1], state.latent_size)
        if state.layout_masks is not None:
            sigma = without_invalid(layout_route(state.layout_masks, grid).to(latent.dtype), state.subject_valid)
        elif state.routing_features is not None:
            logits = self.parts.router(state.routing_features.to(latent.dtype), latent, state.entry_valid(), grid)
            sigma = hard_route(logits.refined, state.gumbel_tau)
            self._supervise_and_record(state, logits, grid)
        else:
            sigma = None
        state.routes[self.layer] = (sigma, grid)
        return sigma

    def _supervise_and_record(self, state: AnyStoryState, logits, grid: tuple[int, int]) -> None:
        if state.target_masks is not None:
            target = F.interpolate(state.target_masks.to(logits.refined.dtype), size=grid, mode="area").flatten(2)
            state.routing_errors.append(routing_errors(logits.refined, target))
            state.coarse_routing_errors.append(routing_errors(logits.coarse, target))
        if state.record_maps:
            state.recorded[self.layer] = RecordedMaps(
                coarse=logits.coarse.detach().softmax(dim=1).unflatten(-1, grid).float().cpu(),
                refined=logits.refined.detach().softmax(dim=1).unflatten(-1, grid).float().cpu(),
            )


class RoutedReferenceAttnProcessor(_RoutedProcessor):
    """attn1 of layer l >= 2: route-guided reference attention (Eqs. 6-8)."""

    def _applies(self) -> bool:
        return self.parts.reference_k is not None  # layer 1 has no preceding route

    def _routed(self, attn, hidden_states, encoder_hidden_states, attention_mask, anystory: AnyStoryState):
        if attention_mask is not None:
            raise NotImplementedError("reference attention does not take a self-attention mask")
        state = anystory
        query, key, value = self._project(attn, hidden_states, hidden_states)
        ref_key, ref_value = state.projected(("reference", self.layer), lambda: self._reference_kv(state))
        if attn.norm_k is not None:
            ref_key = attn.norm_k(ref_key)
        route = state.previous_route(self.layer, grid_size(hidden_states.shape[1], state.latent_size))
        ref_query = None
        if self.parts.reference_q is not None:
            ref_query = split_heads(self.parts.reference_q(hidden_states), attn.heads)
            if attn.norm_q is not None:
                ref_query = attn.norm_q(ref_query)
        out = reference_attention(
            query, key, value, ref_key, ref_value, route, state.reference_shift, state.subject_valid, ref_query
        )
        return self._output(attn, out, hidden_states)

    def _reference_kv(self, state: AnyStoryState) -> tuple[torch.Tensor, torch.Tensor]:
        states = state.reference_states[self.layer]
        heads = self.parts.heads
        return split_heads(self.parts.reference_k(states), heads), split_heads(self.parts.reference_v(states), heads)


def layout_route(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Hard routes (B, N+1, h*w) from user masks (B, N, H, W): each position goes to the
    subject covering most of it, or to the background where none covers half of it."""
    coverage = F.interpolate(masks.float(), size=grid, mode="area").flatten(2)
    background = coverage.new_full((coverage.shape[0], 1, coverage.shape[2]), 0.5)
    scores = torch.cat([coverage, background], dim=1)
    return F.one_hot(scores.argmax(dim=1), scores.shape[1]).transpose(1, 2).float()


def without_invalid(sigma: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Hard routes (B, N+1, L) with the positions of invalid subjects given to the background."""
    if valid is None:
        return sigma
    kept = sigma[:, :-1] * valid[..., None].to(sigma.dtype)
    return torch.cat([kept, 1 - kept.sum(dim=1, keepdim=True)], dim=1)


def routing_errors(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||M_i - M_j^gt||^2 of one layer for every routed subject i and ground-truth mask j,
    (B, N, N); the diagonal holds Eq. 4's terms.

    The squared error is averaged over positions rather than summed, so that layers of
    every resolution weigh the same (the paper does not say which; a sum would let the
    64x64 layers dominate).
    """
    maps = logits.softmax(dim=1)[:, :-1]
    return (maps[:, :, None] - target[:, None]).pow(2).mean(dim=-1)


def routing_loss(
    errors: list[torch.Tensor], valid: torch.Tensor | None, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 4 (before lambda): mean over layers and valid subjects of ||M_i - M_i^gt||^2.

    `errors`: per layer, `routing_errors`. With `groups` (B, N) labels (-1: alone), each
    sample's subjects that share a label may trade ground-truth masks: the permutation
    with the least error over all layers is used. This is a deviation, for twins:
    subjects the caption and the routing features cannot tell apart have no "right"
    mask each, and the plain loss then teaches the router to split every twin region
    50/50, which routes both regions to one twin at inference. Matching (as Mask2Former
    matches its queries to instances) lets it learn any one-to-one split instead.
    """
    stacked = torch.stack(errors)  # (layers, B, N, N)
    layers, batch, num_subjects = stacked.shape[:3]
    owner = torch.arange(num_subjects, device=stacked.device).expand(batch, -1)
    if groups is not None:
        owner = best_permutations(stacked.sum(dim=0).detach(), groups)
    chosen = stacked.gather(-1, owner[None, :, :, None].expand(layers, -1, -1, 1))[..., 0]
    if valid is None:
        return chosen.mean()
    weight = valid.to(chosen.dtype)
    return (chosen * weight).sum() / (weight.sum().clamp(min=1) * layers)


def best_permutations(cost: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per sample, the ground-truth index for each subject that minimises the summed cost
    (B, N, N), permuting only among subjects with the same label >= 0."""
    owners = []
    for sample_cost, labels in zip(cost.cpu(), groups.cpu().tolist()):
        members = [[i for i, g in enumerate(labels) if g == label] for label in sorted(set(labels) - {-1})]
        members = [m for m in members if len(m) > 1]
        best, best_cost = list(range(len(labels))), None
        for choice in itertools.product(*(itertools.permutations(m) for m in members)):
            owner = list(range(len(labels)))
            for group, permuted in zip(members, choice):
                for i, j in zip(group, permuted):
                    owner[i] = j
            total = sum(float(sample_cost[i, j]) for i, j in enumerate(owner))
            if best_cost is None or total < best_cost:
                best, best_cost = owner, total
        owners.append(best)
    return torch.tensor(owners, dtype=torch.long, device=cost.device)
