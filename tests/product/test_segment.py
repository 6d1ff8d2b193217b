"""Reference-prompted segmentation: one routed U-Net pass, masks from the routing maps."""

import numpy as np
import pytest
import torch
from PIL import Image

from anystory.models import RouterLogits, grid_size, transformer_blocks
from anystory.segment import segment, working_size

from .conftest import cutout, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def subjects_of(pipe):
    from anystory import Subject

    return [Subject(cutout(1)), Subject(cutout(2))]


def test_masks_are_where_the_router_sends_each_subject(pipe, monkeypatch):
    """Routers that send the left half of every layer to subject 0 and the right half to
    subject 1: the masks must be exactly those halves, at the image's own size."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    latent_size = tuple(s // pipe.vae_scale_factor for s in working_size(image.size, 32))

    def halves(routing, latent, valid=None, grid=None):
        h, w = grid
        assert grid == grid_size(latent.shape[1], latent_size)  # each router is told its layer's grid
        logits = torch.full((latent.shape[0], 3, h, w), -10.0)
        logits[:, 0, :, : w // 2] = 10
        logits[:, 1, :, w // 2 :] = 10
        return RouterLogits(coarse=logits.flatten(2), refined=logits.flatten(2))

    for layer in pipe.adapter.layers:
        monkeypatch.setattr(layer.router, "forward", halves)
    passes = []
    handle = pipe.unet.register_forward_hook(lambda *args: passes.append(1))
    try:
        result = segment(pipe, image, subjects_of(pipe), resolution=32)
    finally:
        handle.remove()
    assert len(passes) == 1
    assert result.masks.shape == (2, 40, 40) and result.masks.dtype == torch.bool
    expected = torch.zeros(40, 40, dtype=torch.bool)
    expected[:, :20] = True
    assert torch.equal(result.masks[0], expected) and torch.equal(result.masks[1], ~expected)
    assert len(result.routing_maps.refined) == len(transformer_blocks(pipe.unet))


def test_masks_are_the_argmax_of_the_recorded_maps(pipe):
    image = cutout(3, size=(52, 40)).convert("RGB")
    result = segment(pipe, image, subjects_of(pipe), strength=0.8, generator=torch.Generator().manual_seed(0))
    assert result.masks.shape == (2, 40, 52) and result.maps.shape == (3, 40, 52)
    torch.testing.assert_close(result.maps.sum(dim=0), torch.ones(40, 52))
    recorded = result.routing_maps.mean("refined", size=(40, 52))[0, 0]
    owner = recorded.argmax(dim=0)
    for i in range(2):
        assert torch.equal(result.masks[i], owner == i)
    assert torch.equal(result.labels, owner)
    assert not (result.masks[0] & result.masks[1]).any()


def test_strength_picks_the_noise_level(pipe):
    subjects = pipe.encode_subjects(subjects_of(pipe))
    image = cutout(4).convert("RGB")
    loud = segment(pipe, image, subjects, strength=1.0, num_inference_steps=10)
    quiet = segment(pipe, image, subjects, strength=0.2, num_inference_steps=10)
    schedule = type(pipe.scheduler).from_config(pipe.scheduler.config)
    schedule.set_timesteps(10)
    assert loud.timestep == int(schedule.timesteps[0]) and quiet.timestep == int(schedule.timesteps[8])
    with pytest.raises(ValueError, match="strength"):
        segment(pipe, image, subjects, strength=0.0)


def test_working_size_keeps_the_aspect_in_multiples_of_8():
    assert working_size((1024, 768), 1024) == (768, 1024)
    assert working_size((50, 100), 64) == (64, 32)  # (width, height) in, (height, width) out
