import json

import numpy as np

import pytest
import torch
from safetensors.torch import load_file, save_file

from anystory import AnyStoryAdapter, AnyStoryState
from anystory.models import AdapterWeightsError, transformer_blocks
from anystory.models.adapter import WEIGHTS_NAME
from anystory.models.routed_attention import routing_loss

from .conftest import TINY_ADAPTER, make_adapter


def test_save_and_load_round_trip_bit_exactly(components, tmp_path):
    adapter = make_adapter(components["unet"])
    adapter.save_pretrained(tmp_path)
    loaded = AnyStoryAdapter.from_pretrained(tmp_path)
    original, restored = adapter.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.config.reference_size == TINY_ADAPTER["reference_size"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd.pop("layers.3.subject_k.weight"), "1 missing .*layers.3.subject_k.weight"),
        (lambda sd: sd.__setitem__("layers.99.extra", torch.zeros(1)), "1 unexpected .*layers.99.extra"),
        (lambda sd: sd.__setitem__("routing_qformer.queries", torch.zeros(2, 32)), "wrong shape .*routing_qformer.queries"),
    ],
)
def test_mismatched_weights_raise_a_clear_error(components, tmp_path, corrupt, message):
    make_adapter(components["unet"]).save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    corrupt(state)
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterWeightsError, match=message):
        AnyStoryAdapter.from_pretrained(tmp_path)


def test_sharded_weights_load_as_one_and_a_missing_shard_is_named(components, tmp_path):
    adapter = make_adapter(components["unet"])
    adapter.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / WEIGHTS_NAME).exists()
    loaded = AnyStoryAdapter.from_pretrained(tmp_path)
    original, restored = adapter.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    shards[-1].unlink()
    with pytest.raises(AdapterWeightsError, match=f"incomplete.*{shards[-1].name}"):
        AnyStoryAdapter.from_pretrained(tmp_path)


def test_a_shard_with_a_wrong_tensor_is_caught_like_a_single_file(components, tmp_path):
    make_adapter(components["unet"]).save_pretrained(tmp_path, max_shard_size="200KB")
    shard = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))[0]
    state = load_file(shard)
    key = sorted(state)[0]
    state[key] = torch.zeros(3, 3, 3)
    save_file(state, shard)
    with pytest.raises(AdapterWeightsError, match=f"wrong shape .*{key}"):
        AnyStoryAdapter.from_pretrained(tmp_path)


def test_pickle_weights_are_refused_unless_allowed(components, tmp_path):
    adapter = make_adapter(components["unet"])
    adapter.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(AdapterWeightsError, match="pickle"):
        AnyStoryAdapter.from_pretrained(tmp_path)
    loaded = AnyStoryAdapter.from_pretrained(tmp_path, allow_pickle=True, use_safetensors=False)
    assert torch.equal(loaded.layers[2].subject_v.weight, adapter.layers[2].subject_v.weight)


def test_missing_folder_contents_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(AdapterWeightsError, match="no adapter weights"):
        AnyStoryAdapter.from_pretrained(tmp_path)


def test_new_projections_start_from_the_unets(components):
    unet = components["unet"]
    adapter = AnyStoryAdapter.from_unet(unet, **TINY_ADAPTER)
    for layer, (parts, block) in enumerate(zip(adapter.layers, transformer_blocks(unet))):
        assert torch.equal(parts.subject_k.weight, block.attn2.to_k.weight)
        assert torch.equal(parts.subject_v.weight, block.attn2.to_v.weight)
        if layer == 0:
            assert parts.reference_k is None
        else:
            assert torch.equal(parts.reference_k.weight, block.attn1.to_k.weight)


def test_attach_leaves_unet_weights_alone_and_detach_restores_it(components):
    unet = components["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = unet.attn_processors
    adapter = make_adapter(unet)
    adapter.attach(unet)
    with pytest.raises(RuntimeError, match="already attached"):
        adapter.attach(unet)
    adapter.detach(unet)
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}


def test_attach_refuses_another_topology(components):
    from anystory.testing import tiny_unet

    adapter = make_adapter(components["unet"])
    other = tiny_unet(cross_attention_dim=48)
    with pytest.raises(ValueError, match="text width"):
        adapter.attach(other)


def _training_forward(components, adapter, with_target_masks: bool):
    unet = components["unet"]
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    clip = components["image_encoder"](torch.randn(3, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
    vae_latents = components["vae"].encode(torch.randn(2, 3, 32, 32)).latent_dist.mode()
    encodings = adapter.encode(clip, vae_latents, torch.ones(2, 1, *vae_latents.shape[-2:]), (32, 32))
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :, :8] = 1
    masks[0, 1, :, 8:] = 1
    state = AnyStoryState.from_encodings(
        encodings, batch_size=1, latent_size=(16, 16), gumbel_tau=1.0,
        target_masks=masks if with_target_masks else None,
    )
    noise_pred = unet(
        torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=torch.randn(1, 7, 32),
        added_cond_kwargs={"text_embeds": torch.randn(1, text_dim), "time_ids": torch.randn(1, 6)},
        cross_attention_kwargs={"anystory": state},
    ).sample
    return noise_pred, state


def test_training_gradients_reach_exactly_the_adapter(components):
    frozen = [components[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")]
    for model in frozen:
        model.requires_grad_(False)
    adapter = make_adapter(components["unet"])
    adapter.attach(components["unet"])
    noise_pred, state = _training_forward(components, adapter, with_target_masks=True)
    loss = noise_pred.pow(2).mean() + 0.1 * routing_loss(state.routing_errors, None)
    loss.backward()
    groups = {
        "subject QFormer": adapter.subject_qformer, "routing QFormer": adapter.routing_qformer,
        "ReferenceNet": adapter.reference_net.unet.down_blocks,
    }
    for name, module in groups.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    for layer in adapter.layers[1:]:
        for proj in (layer.subject_k, layer.subject_v, layer.reference_k, layer.reference_v):
            assert proj.weight.grad.abs().sum() > 0
        assert layer.router.refined_latent.weight.grad.abs().sum() > 0
    base_params = [p for model in frozen for p in model.parameters() if not any(p is q for q in adapter.parameters())]
    assert base_params and all(p.grad is None for p in base_params)


def test_router_learns_from_the_diffusion_loss_through_straight_through_gumbel(components):
    components["unet"].requires_grad_(False)
    adapter = make_adapter(components["unet"])
    adapter.attach(components["unet"])
    noise_pred, state = _training_forward(components, adapter, with_target_masks=False)
    assert state.routing_errors == []
    noise_pred.pow(2).mean().backward()
    router = adapter.layers[4].router
    assert router.refined_route.weight.grad.abs().sum() > 0
    assert adapter.routing_qformer.queries.grad.abs().sum() > 0


def test_clip_only_ablation_has_no_reference_net_and_no_reference_attention(components, tmp_path):
    from anystory import AnyStorySDXLPipeline

    from .conftest import random_subject

    adapter = AnyStoryAdapter.from_unet(components["unet"], **TINY_ADAPTER, use_reference_net=False)
    assert adapter.reference_net is None and all(layer.reference_k is None for layer in adapter.layers)
    assert not any("reference" in k for k in adapter.state_dict())
    adapter.save_pretrained(tmp_path)
    adapter = AnyStoryAdapter.from_pretrained(tmp_path)
    pipe = AnyStorySDXLPipeline(**components, adapter=adapter)
    differences = []

    def compare_with_plain_self_attention(attn, args, out):
        differences.append((out - attn.processor.original(attn, args[0])).abs().max().item())

    for block in transformer_blocks(pipe.unet):
        block.attn1.register_forward_hook(compare_with_plain_self_attention)
    encodings = pipe.encode_subjects([random_subject(0)])
    assert encodings.reference_states == {}
    out = pipe("a dog", subjects=encodings, num_inference_steps=2, height=64, width=64, output_type="np")
    assert np.isfinite(out.images).all()
    assert len(differences) == 2 * len(adapter.layers) and max(differences) == 0.0


def test_routing_from_reference_tells_apart_subjects_that_clip_sees_alike(components):
    """Paper default: the routing feature is a function of CLIP alone, so two references
    with the same CLIP tokens get the same feature. The deviation also reads the finest
    ReferenceNet states: different references then give different features, the null row
    still gets its own, and the new projection is trained with the router."""
    torch.manual_seed(0)
    clip = components["image_encoder"](torch.randn(2, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
    clip = torch.cat([clip[:1], clip[:1], clip[1:]])  # two subjects CLIP sees alike, then the null image
    latents = components["vae"].encode(torch.randn(2, 3, 32, 32)).latent_dist.mode()
    masks = torch.ones(2, 1, *latents.shape[-2:])
    paper = make_adapter(components["unet"])
    features = paper.encode(clip, latents, masks, (32, 32)).routing_features
    torch.testing.assert_close(features[0], features[1])

    adapter = AnyStoryAdapter.from_unet(components["unet"], **TINY_ADAPTER, routing_from_reference=True)
    encodings = adapter.encode(clip, latents, masks, (32, 32))
    assert (encodings.routing_features[0] - encodings.routing_features[1]).abs().max() > 1e-3
    alike = adapter.encode(clip, latents[:1].expand(2, -1, -1, -1), masks, (32, 32)).routing_features
    torch.testing.assert_close(alike[0], alike[1])
    trained = adapter.router_parameters()
    assert any(p is adapter.reference_routing.weight for p in trained)
    assert not any(p is adapter.reference_routing.weight for p in adapter.subject_encoder_parameters())
    with pytest.raises(ValueError, match="routing_from_reference needs the ReferenceNet"):
        AnyStoryAdapter.from_unet(components["unet"], **TINY_ADAPTER, use_reference_net=False, routing_from_reference=True)


def test_reference_query_starts_as_the_papers_attention_and_trains_in_stage_1(components):
    """The `reference_query` deviation: Q~ starts as a copy of to_q (so a fresh adapter
    computes exactly the paper's reference attention), belongs to the subject encoder's
    parameters, and receives gradients."""
    components["unet"].requires_grad_(False)
    paper = make_adapter(components["unet"])
    adapter = AnyStoryAdapter.from_unet(components["unet"], **TINY_ADAPTER, reference_query=True)
    adapter.load_state_dict(paper.state_dict(), strict=False)  # the same weights except Q~
    blocks = transformer_blocks(components["unet"])
    for layer, block in zip(adapter.layers[1:], blocks[1:]):
        assert torch.equal(layer.reference_q.weight, block.attn1.to_q.weight)
    assert adapter.layers[0].reference_q is None  # layer 1 has no reference attention
    torch.manual_seed(0)
    paper.attach(components["unet"])
    expected, _ = _training_forward(components, paper, with_target_masks=False)
    paper.detach(components["unet"])
    adapter.attach(components["unet"])
    torch.manual_seed(0)
    out, _ = _training_forward(components, adapter, with_target_masks=False)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.pow(2).mean().backward()
    trained = adapter.subject_encoder_parameters()
    for layer in adapter.layers[1:]:
        assert any(p is layer.reference_q.weight for p in trained)
        assert layer.reference_q.weight.grad.abs().sum() > 0
    adapter.detach(components["unet"])
    with pytest.raises(ValueError, match="reference_query needs the ReferenceNet"):
        AnyStoryAdapter.from_unet(components["unet"], **TINY_ADAPTER, use_reference_net=False, reference_query=True)


@torch.no_grad()
def test_router_context_grows_on_a_trained_adapter_that_routes_as_before(components):
    adapter = make_adapter(components["unet"])
    with pytest.raises(ValueError, match="router_context=0"):
        adapter.router_context_parameters()
    grown = adapter.with_router_context(2)
    assert grown.config.router_context == 2
    original = adapter.state_dict()
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in original.items())
    new = [k for k in grown.state_dict() if k not in original]
    assert new and all(".latent_context." in k for k in new)
    assert {id(p) for p in grown.router_context_parameters()} == {
        id(p) for k, p in grown.named_parameters() if k in new}
    torch.manual_seed(0)
    routing = torch.randn(1, 3, TINY_ADAPTER["routing_dim"])
    for before, after in zip(adapter.layers, grown.layers):
        latent = torch.randn(1, 16, before.subject_k.out_features)
        assert torch.equal(after.router(routing, latent, grid=(4, 4)).refined, before.router(routing, latent).refined)
    with pytest.raises(ValueError, match="already has router context"):
        grown.with_router_context(1)
