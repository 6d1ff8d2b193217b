"""Fixtures: tiny random SDXL-shaped components and an adapter for them (no download)."""

import numpy as np
import pytest
import torch

from anystory import AnyStoryAdapter, AnyStorySDXLPipeline, Subject
from anystory.testing import tiny_sdxl_components

TINY_ADAPTER = dict(
    image_embed_dim=24, num_subject_tokens=4, qformer_dim=32, qformer_heads=4,
    routing_dim=32, router_dim=16, router_heads=2, reference_size=32,
)


def make_adapter(unet, seed: int = 1) -> AnyStoryAdapter:
    torch.manual_seed(seed)
    adapter = AnyStoryAdapter.from_unet(unet, **TINY_ADAPTER)
    randomize_new_parameters(adapter)
    return adapter


@torch.no_grad()
def randomize_new_parameters(adapter: AnyStoryAdapter) -> None:
    """A freshly built adapter mirrors the U-Net (zero mask channel, copied projections);
    perturb it so that tests see every path carry signal, as after training."""
    for p in adapter.parameters():
        p.add_(torch.randn_like(p) * 0.05)


@pytest.fixture
def components():
    return tiny_sdxl_components(seed=0)


@pytest.fixture
def pipe(components):
    return AnyStorySDXLPipeline(**components, adapter=make_adapter(components["unet"]))


def random_subject(seed: int, name: str = "") -> Subject:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(40, 52, 3), dtype=np.uint8)
    mask = np.zeros((40, 52), dtype=bool)
    top, left = rng.integers(0, 10, size=2)
    mask[top : top + 25, left : left + 30] = True
    return Subject(image, mask, name=name or f"s{seed}")


@pytest.fixture
def subjects():
    return [random_subject(seed) for seed in range(4)]
