"""The main job: one single-subject and one two-subject generation, with routing overlays.

Until the mini world's trained weights ship, it runs on tiny RANDOM weights
(`anystory.testing`): the images are noise-like, but every stage of the method runs —
subject preprocessing, CLIP + QFormers, ReferenceNet, router, routed attention.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import AnyStoryAdapter, AnyStorySDXLPipeline, Subject
from .testing import tiny_sdxl_components

PALETTE = np.array([[230, 60, 60], [60, 110, 230], [60, 190, 90], [230, 200, 60]], dtype=np.float32)


def routing_overlay(image: Image.Image, maps: torch.Tensor) -> Image.Image:
    """Colour each pixel by the subject its route points to (background left as is)."""
    owner = maps.argmax(dim=0)  # (h, w) with N = background
    owner = np.asarray(Image.fromarray(owner.numpy().astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST))
    pixels = np.asarray(image, dtype=np.float32)
    background = maps.shape[0] - 1
    for i in range(background):
        pixels[owner == i] = 0.5 * pixels[owner == i] + 0.5 * PALETTE[i % len(PALETTE)]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _toy_subject(colour: tuple[int, int, int], seed: int) -> Subject:
    rng = np.random.default_rng(seed)
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[12:52, 16:48] = True
    image[mask] = colour
    image[20:44:8, 24:40:8] = rng.integers(0, 255, size=3)
    return Subject(image, mask, name=f"subject{seed}")


def run_demo(out: Path, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    components = tiny_sdxl_components(seed)
    torch.manual_seed(seed)
    adapter = AnyStoryAdapter.from_unet(
        components["unet"], image_embed_dim=24, num_subject_tokens=4, qformer_dim=32, qformer_heads=4,
        routing_dim=32, router_dim=16, router_heads=2, reference_size=32, router_trained=True,
    )
    pipe = AnyStorySDXLPipeline(**components, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    subjects = [_toy_subject((200, 40, 40), 1), _toy_subject((40, 60, 200), 2)]
    rows = []
    for name, prompt, cast in [
        ("single", "a red dog on the beach", subjects[:1]),
        ("pair", "on the left a red dog, on the right a blue cat", subjects),
    ]:
        result = pipe(prompt, subjects=cast, height=64, width=64, num_inference_steps=10,
                      generator=torch.Generator().manual_seed(seed), return_routing_maps=True)
        image = result.images[0]
        image.save(out / f"{name}.png")
        overlay = routing_overlay(image, result.routing_maps.mean()[-1, 0])
        overlay.save(out / f"{name}_routing.png")
        rows.append((prompt, f"{name}.png", f"{name}_routing.png"))
    index = out / "index.html"
    cells = "".join(
        f"<tr><td>{html.escape(p)}</td><td><img src='{a}' width=192></td><td><img src='{b}' width=192></td></tr>"
        for p, a, b in rows
    )
    index.write_text(
        "<html><body><h1>AnyStory demo (tiny random weights)</h1>"
        f"<table><tr><th>prompt</th><th>image</th><th>routing</th></tr>{cells}</table></body></html>"
    )
    return index
