import pytest
import torch
from diffusers import UNet2DConditionModel

from anystory.models import ReferenceNet, sdxl_unet_config, transformer_blocks


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_reference_net_has_the_papers_parameter_count_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_unet_config())
    net = ReferenceNet.from_unet(unet)
    assert net.device.type == "meta"
    assert len(transformer_blocks(unet)) == 70
    assert count(unet) == pytest.approx(2.57e9, rel=0.005)  # paper Table 1
    assert count(net) == pytest.approx(2.02e9, rel=0.005)


def test_cross_attention_removed_and_mask_channel_starts_at_zero(components):
    unet = components["unet"]
    net = ReferenceNet.from_unet(unet)
    assert all(b.attn2 is None and b.norm2 is None for b in transformer_blocks(net.unet))
    weight = net.unet.conv_in.weight
    assert weight.shape[1] == unet.conv_in.weight.shape[1] + 1
    assert torch.equal(weight[:, :-1], unet.conv_in.weight) and torch.all(weight[:, -1] == 0)


@torch.no_grad()
def test_states_equal_the_unets_self_attention_inputs_when_text_attention_is_silent(components):
    """With zero text and zero attn2 output bias, the U-Net's cross-attention adds nothing,
    so the ReferenceNet (which has none) must see exactly the U-Net's attn1 inputs."""
    unet = components["unet"]
    for block in transformer_blocks(unet):
        block.attn2.to_out[0].bias.zero_()
    net = ReferenceNet.from_unet(unet)
    latents, mask = torch.randn(2, 4, 8, 8), torch.ones(2, 1, 8, 8)
    states = net(latents, mask, pixel_size=(32, 32))

    captured = {}
    blocks = transformer_blocks(unet)
    hooks = [
        b.attn1.register_forward_pre_hook(lambda m, a, l=l: captured.__setitem__(l, a[0]))
        for l, b in enumerate(blocks)
    ]
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    unet(
        latents, 0, encoder_hidden_states=torch.zeros(2, 1, unet.config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.zeros(2, text_dim), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)},
    )
    for h in hooks:
        h.remove()
    assert sorted(states) == list(range(1, len(blocks)))  # layer 1 (index 0) is skipped
    for layer, hidden in states.items():
        torch.testing.assert_close(hidden, captured[layer], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_nothing_after_the_last_self_attention_runs(components):
    net = ReferenceNet.from_unet(components["unet"])
    ran = []
    net.unet.conv_out.register_forward_hook(lambda *a: ran.append("conv_out"))
    net.unet.up_blocks[-1].register_forward_hook(lambda *a: ran.append("last up block"))
    net(torch.randn(1, 4, 8, 8), torch.ones(1, 1, 8, 8), pixel_size=(32, 32))
    assert ran == []


def test_used_parameters_are_exactly_those_that_receive_gradients(components):
    net = ReferenceNet.from_unet(components["unet"])
    states = net(torch.randn(1, 4, 8, 8), torch.ones(1, 1, 8, 8), pixel_size=(16, 16))
    sum(s.pow(2).sum() for s in states.values()).backward()
    with_grad = {id(p) for p in net.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    used = {id(p) for p in net.used_parameters()}
    assert with_grad == used
    assert id(net.unet.conv_out.weight) not in used and len(used) < len(list(net.parameters()))
