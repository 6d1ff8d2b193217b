import math

import pytest
import torch

from anystory.models import AnyStoryState, grid_size, hard_route, transformer_blocks
from anystory.models.routed_attention import (
    layout_route,
    reference_attention,
    routing_errors,
    routing_loss,
    subject_attention,
)
from anystory.models.router import RouterLayer, _routed_positions

from .conftest import make_adapter


def naive_attention(q, k, v, bias):
    weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(dim=-1)
    return weights @ v


def reference_bias(route, num_subjects, own_len, ref_len, shift):
    """Eq. 8 literally: Bias = [0, g(M_1) + gamma, ..., g(M_N) + gamma] per query."""
    batch, length = route.shape
    parts = [torch.zeros(batch, length, own_len)]
    for i in range(num_subjects):
        g = torch.where(route == i, 0.0, float("-inf"))
        parts.append((g + shift)[..., None].expand(-1, -1, ref_len))
    return torch.cat(parts, dim=-1)[:, None]


@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_grouped_reference_attention_equals_eqs_6_to_8(shift):
    torch.manual_seed(0)
    B, H, L, S, D, N = 2, 3, 12, 5, 8, 3
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    rk, rv = torch.randn(B, N, H, S, D), torch.randn(B, N, H, S, D)
    route = torch.randint(0, N + 1, (B, L))
    route[0, :3] = N  # some background positions
    out = reference_attention(q, k, v, rk, rv, route, shift)
    keys = torch.cat([k, rk.transpose(1, 2).flatten(2, 3)], dim=2)
    values = torch.cat([v, rv.transpose(1, 2).flatten(2, 3)], dim=2)
    expected = naive_attention(q, keys, values, reference_bias(route, N, L, S, shift))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # background positions attend only to their own keys and values
    torch.testing.assert_close(out[0, :, :3], naive_attention(q[0, :, :3], k[0], v[0], 0.0), rtol=1e-5, atol=1e-5)


def test_reference_attention_without_router_lets_every_subject_act_everywhere():
    torch.manual_seed(1)
    B, H, L, S, D, N = 1, 2, 6, 4, 8, 2
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    rk, rv = torch.randn(1, N, H, S, D), torch.randn(1, N, H, S, D)
    valid = torch.tensor([[True, False]])
    out = reference_attention(q, k, v, rk, rv, None, shift=0.5, valid=valid)
    keys = torch.cat([k, rk[:, 0]], dim=2)  # the padded subject 2 is excluded
    values = torch.cat([v, rv[:, 0]], dim=2)
    bias = torch.cat([torch.zeros(L), torch.full((S,), 0.5)])
    torch.testing.assert_close(out, naive_attention(q, keys, values, bias), rtol=1e-5, atol=1e-5)


def test_subject_attention_is_the_sigma_weighted_sum_of_eq_5():
    torch.manual_seed(2)
    B, H, L, T, D, N = 2, 2, 10, 4, 8, 3
    q = torch.randn(B, H, L, D)
    sk, sv = torch.randn(B, N + 1, H, T, D), torch.randn(B, N + 1, H, T, D)
    sigma = hard_route(torch.randn(B, N + 1, L))
    per_entry = [naive_attention(q, sk[:, i], sv[:, i], 0.0) for i in range(N + 1)]
    expected = sum(sigma[:, i, None, :, None] * per_entry[i] for i in range(N + 1))
    torch.testing.assert_close(subject_attention(q, sk, sv, sigma), expected, rtol=1e-5, atol=1e-5)
    # the straight-through (dense) training path computes the same forward value
    soft = sigma.clone().requires_grad_(True)
    torch.testing.assert_close(subject_attention(q, sk, sv, soft), expected, rtol=1e-5, atol=1e-5)
    # no router: all subjects everywhere, the background nowhere
    torch.testing.assert_close(subject_attention(q, sk, sv, None), sum(per_entry[:N]), rtol=1e-5, atol=1e-5)


def test_straight_through_gumbel_is_one_hot_forward_and_passes_gradients():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    sigma = hard_route(logits, gumbel_tau=1.0)
    assert torch.all(sigma.sum(dim=1) == 1) and set(sigma.unique().tolist()) <= {0.0, 1.0}
    (sigma * torch.randn_like(sigma)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_layout_route_assigns_covered_positions_and_background():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :, :4] = 1
    masks[0, 1, :4, 4:] = 1
    route = layout_route(masks, (4, 4)).argmax(dim=1).view(4, 4)
    assert torch.all(route[:, :2] == 0) and torch.all(route[:2, 2:] == 1) and torch.all(route[2:, 2:] == 2)


def test_previous_route_is_resampled_nearest_to_the_next_grid():
    sigma = torch.zeros(1, 3, 16)
    route = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]).flatten()
    sigma[0, route, torch.arange(16)] = 1
    state = AnyStoryState(subject_tokens=torch.zeros(1, 3, 1, 1), reference_states={}, latent_size=(8, 8))
    state.routes[4] = (sigma, (4, 4))
    assert state.previous_route(5, (2, 2)).tolist() == [[0, 1, 2, 2]]
    assert state.previous_route(5, (4, 4)).tolist() == [route.tolist()]


def test_router_masked_attention_sees_only_routed_positions_or_everything_when_empty():
    coarse = torch.tensor([[[5.0, 5.0, 0.0], [0.0, 0.0, 5.0], [-1.0, -1.0, -1.0]]])
    visible = _routed_positions(coarse)
    assert visible[0].tolist() == [[True, True, False], [False, False, True], [True, True, True]]


def _layer_grids(unet, latent):
    """Each transformer block's token grid, read off one plain U-Net forward."""
    lengths = {}
    blocks = transformer_blocks(unet)
    hooks = [b.attn1.register_forward_pre_hook(lambda m, a, l=l: lengths.__setitem__(l, a[0].shape[1])) for l, b in enumerate(blocks)]
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    unet(
        torch.zeros(1, 4, *latent), 0, encoder_hidden_states=torch.zeros(1, 1, unet.config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.zeros(1, text_dim), "time_ids": torch.zeros(1, 6)},
    )
    for h in hooks:
        h.remove()
    return [grid_size(lengths[l], latent) for l in range(len(blocks))]


def _paper_router_and_its_context_twin(batch: int):
    """Two subjects and the background on a 4 x 4 grid; a paper router and one with two
    context convolutions sharing its weights (the convolutions as initialised)."""
    torch.manual_seed(0)
    routing, latent = torch.randn(batch, 3, 6), torch.randn(batch, 16, 8)
    plain, context = RouterLayer(6, 8, 16, 2), RouterLayer(6, 8, 16, 2, context_layers=2)
    context.load_state_dict(plain.state_dict(), strict=False)
    return routing, latent, plain, context


def _randomize_context(router: RouterLayer) -> None:
    for conv in router.latent_context.convs:
        torch.nn.init.normal_(conv.weight)


@torch.no_grad()
def test_router_context_starts_as_the_paper_router_and_then_reads_neighbours():
    routing, latent, plain, context = _paper_router_and_its_context_twin(1)
    grid = (4, 4)
    assert torch.allclose(context(routing, latent, grid=grid).refined, plain(routing, latent).refined)

    _randomize_context(context)
    neighbour = latent.clone()
    neighbour[0, 1] += 1.0  # position (0, 1) is next to (0, 0); (3, 3) is three cells away
    # the coarse logits (the refined ones also see every position through the masked attention)
    before, after = (context(routing, z, grid=grid).coarse for z in (latent, neighbour))
    assert not torch.allclose(before[..., 0], after[..., 0])  # 2 convs: a 5 x 5 neighbourhood
    assert torch.allclose(before[..., 15], after[..., 15])
    plain_before, plain_after = (plain(routing, z).coarse for z in (latent, neighbour))
    assert torch.allclose(plain_before[..., 0], plain_after[..., 0])  # the paper's: per position
    with pytest.raises(ValueError, match="grid"):
        context(routing, latent)


@torch.no_grad()
def test_router_context_is_used_only_for_samples_with_two_or_more_subjects():
    routing, latent, plain, context = _paper_router_and_its_context_twin(2)
    grid = (4, 4)
    _randomize_context(context)
    # sample 0 routes two subjects; sample 1 only its first (its second is padding)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    mixed = context(routing, latent, valid, grid).coarse
    reference = plain(routing, latent, valid).coarse
    assert not torch.allclose(mixed[0], reference[0])
    assert torch.equal(mixed[1], reference[1])
    one_subject = context(routing[:, ::2], latent, grid=grid).coarse  # no valid mask: N = 1
    assert torch.equal(one_subject, plain(routing[:, ::2], latent).coarse)


def test_routing_isolation_per_layer(components):
    """Changing subject 2's inputs leaves both routed attentions unchanged wherever
    the hard route points to subject 1 or the background (and does change them where
    it points to subject 2)."""
    unet = components["unet"]
    latent = (16, 16)
    grids = _layer_grids(unet, latent)
    assert len(set(grids)) == 2  # routes are resampled between resolutions
    make_adapter(unet).attach(unet)
    masks = torch.zeros(2, 2, 16, 16)
    masks[:, 0, :, :6] = 1
    masks[:, 1, :, 10:] = 1
    blocks = transformer_blocks(unet)

    def make_state(seed_of_subject_2):
        tokens = torch.randn(2, 3, 4, 32, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(seed_of_subject_2)
        tokens[:, 1] = torch.randn(2, 4, 32, generator=g)
        refs = {}
        for layer, block in enumerate(blocks):
            states = torch.randn(1, 2, 16, block.attn1.query_dim, generator=torch.Generator().manual_seed(layer))
            states[:, 1] = torch.randn(16, block.attn1.query_dim, generator=g)
            refs[layer] = states
        return AnyStoryState(subject_tokens=tokens, reference_states=refs, latent_size=latent, layout_masks=masks)

    states = make_state(1), make_state(2)
    for layer, (block, grid) in enumerate(zip(blocks, grids)):
        g = torch.Generator().manual_seed(100 + layer)
        hidden = torch.randn(2, grid[0] * grid[1], block.attn1.query_dim, generator=g)
        text = torch.randn(2, 5, block.attn2.to_k.in_features, generator=g)
        outs = []
        for state in states:
            if layer > 0:
                block_before = blocks[layer - 1]
                block_before.attn2(torch.randn(2, grids[layer - 1][0] * grids[layer - 1][1], block_before.attn1.query_dim), text[..., : block_before.attn2.to_k.in_features], anystory=state)
            outs.append((block.attn1(hidden, anystory=state), block.attn2(hidden, text, anystory=state)))
        keep = layout_route(masks, grid).argmax(dim=1) != 1  # positions of subject 1 and background
        (self_a, cross_a), (self_b, cross_b) = outs
        assert torch.equal(cross_a[keep], cross_b[keep]), f"layer {layer} attn2 leaks subject 2"
        assert not torch.allclose(cross_a[~keep], cross_b[~keep]), f"layer {layer} attn2 ignores subject 2"
        if layer == 0:  # layer 1 has no preceding route, hence no reference attention
            assert torch.equal(self_a, self_b)
            continue
        # attn1 follows the preceding layer's route, resampled to this grid (Eq. 8)
        keep = states[0].previous_route(layer, grid) != 1
        assert torch.equal(self_a[keep], self_b[keep]), f"layer {layer} attn1 leaks subject 2"
        assert not torch.allclose(self_a[~keep], self_b[~keep]), f"layer {layer} attn1 ignores subject 2"


def _one_hot_logits(owner: torch.Tensor, num_entries: int) -> torch.Tensor:
    """(B, L) owner indices -> confident logits (B, N+1, L)."""
    return 50.0 * torch.nn.functional.one_hot(owner, num_entries).permute(0, 2, 1).float()


def test_routing_loss_is_eq_4_and_matching_lets_only_twins_trade_masks():
    # 3 subjects on a 6-position strip; ground truth: subject k owns positions 2k, 2k+1
    target = torch.zeros(1, 3, 6)
    for k in range(3):
        target[0, k, 2 * k:2 * k + 2] = 1
    swapped = torch.tensor([[1, 1, 0, 0, 2, 2]])  # the router swapped subjects 0 and 1
    errors = [routing_errors(_one_hot_logits(swapped, 4), target)]
    torch.testing.assert_close(errors[0][0].diagonal(), torch.tensor([4 / 6, 4 / 6, 0.0]), atol=1e-6, rtol=0)
    plain = routing_loss(errors, None)  # Eq. 4: mean over subjects of the mean squared error
    torch.testing.assert_close(plain, torch.tensor(8 / 18), atol=1e-6, rtol=0)
    twins = torch.tensor([[0, 0, 1]])  # 0 and 1 are twins: the swap is as good as the truth
    assert routing_loss(errors, None, twins).item() < 1e-6
    strangers = torch.tensor([[0, 1, 2]])
    torch.testing.assert_close(routing_loss(errors, None, strangers), plain)
    # subject 2 is padding: it counts neither in the loss nor as anybody's twin
    valid = torch.tensor([[True, True, False]])
    padded = torch.tensor([[0, 0, -1]])
    assert routing_loss(errors, valid, padded).item() < 1e-6
    torch.testing.assert_close(routing_loss(errors, valid), torch.tensor(8 / 12), atol=1e-6, rtol=0)


def test_matched_routing_loss_keeps_gradients_and_one_permutation_for_all_layers():
    target = torch.zeros(2, 2, 4)
    target[:, 0, :2], target[:, 1, 2:] = 1, 1
    logits = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(3)]
    errors = [routing_errors(l, target) for l in logits]
    loss = routing_loss(errors, None, torch.tensor([[0, 0], [0, 1]]))
    loss.backward()
    assert all(l.grad is not None and l.grad.abs().sum() > 0 for l in logits)
    # sample 0 (twins) takes the permutation with the least error summed over layers, the
    # same for every layer; sample 1 (strangers) keeps its own masks
    total = torch.stack(errors).sum(0)[0].detach()
    straight, crossed = total[0, 0] + total[1, 1], total[0, 1] + total[1, 0]
    expected = torch.stack([e[b].diagonal() if (b == 1 or straight <= crossed) else e[b].flip(-1).diagonal()
                            for e in errors for b in range(2)]).mean()
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("routed", [True, False])
def test_separate_reference_query_scores_own_keys_with_q_and_reference_keys_with_q_tilde(routed):
    """The `reference_query` deviation: one softmax over [Q.K, Q~.K~ + bias], in one call."""
    torch.manual_seed(2)
    B, H, L, S, D, N = 2, 2, 10, 4, 8, 2
    q, k, v, q_ref = (torch.randn(B, H, L, D) for _ in range(4))
    rk, rv = torch.randn(B, N, H, S, D), torch.randn(B, N, H, S, D)
    route = torch.randint(0, N + 1, (B, L)) if routed else None
    out = reference_attention(q, k, v, rk, rv, route, 0.7, ref_query=q_ref)
    scale = 1 / math.sqrt(D)
    logits = torch.cat([q @ k.transpose(-1, -2) * scale] + [q_ref @ rk[:, i].transpose(-1, -2) * scale for i in range(N)], -1)
    bias = reference_bias(route, N, L, S, 0.7) if routed else torch.cat([torch.zeros(L), torch.full((N * S,), 0.7)])
    values = torch.cat([v, rv.transpose(1, 2).flatten(2, 3)], dim=2)
    torch.testing.assert_close(out, (logits + bias).softmax(-1) @ values, rtol=1e-5, atol=1e-5)
    # with Q~ = Q it is the paper's attention exactly
    torch.testing.assert_close(reference_attention(q, k, v, rk, rv, route, 0.7, ref_query=q),
                               reference_attention(q, k, v, rk, rv, route, 0.7), rtol=1e-5, atol=1e-5)
