"""Fixtures: a tiny random SDXL + adapter + CLIP encoder saved to folders (loaded by path,
as a user's real model would be) and reference images written to disk."""

from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from anystory import AnyStorySDXLPipeline
from anystory.testing import tiny_sdxl_components
from tests.core.conftest import make_adapter

SIZE = ["--height", "64", "--width", "64"]


def tiny_pipeline() -> AnyStorySDXLPipeline:
    """Random tiny components, an adapter with every path carrying signal, router on."""
    components = tiny_sdxl_components(seed=0)
    adapter = make_adapter(components["unet"])
    adapter.register_to_config(router_trained=True)
    pipe = AnyStorySDXLPipeline(**components, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """An SDXL diffusers folder with `adapter/` and `image_encoder/` inside it."""
    root = tmp_path_factory.mktemp("tiny-model") / "sdxl"
    pipe = tiny_pipeline()
    pipe.adapter.detach(pipe.unet)
    base = {k: v for k, v in pipe.components.items() if k not in ("adapter", "image_encoder", "feature_extractor")}
    StableDiffusionXLPipeline(**base).save_pretrained(root)
    pipe.adapter.save_pretrained(root / "adapter")
    pipe.image_encoder.save_pretrained(root / "image_encoder")
    pipe.feature_extractor.save_pretrained(root / "image_encoder")
    return root


def cutout(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A random RGBA reference whose alpha (a rectangle) is the subject's mask."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 255, size=(height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 0
    pixels[5:height - 5, 8:width - 8, 3] = 255
    return Image.fromarray(pixels, "RGBA")


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> dict[str, Path]:
    """Files: an RGBA cut-out, an RGB image with its mask, left/right layout masks, junk."""
    root = tmp_path_factory.mktemp("references")
    paths = {name: root / f"{name}.png" for name in ("cutout", "photo", "mask", "left", "right", "small_mask")}
    cutout(1).save(paths["cutout"])
    photo = cutout(2)
    photo.convert("RGB").save(paths["photo"])
    photo.getchannel("A").save(paths["mask"])
    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(paths["left"])
    Image.fromarray(255 - left).save(paths["right"])
    Image.new("L", (10, 10), 255).save(paths["small_mask"])
    paths["junk"] = root / "junk.png"
    paths["junk"].write_bytes(b"this is not an image")
    return paths
