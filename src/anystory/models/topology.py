"""Where the paper's "layer l" lives in a diffusers U-Net, and how big its token grid is."""

from __future__ import annotations

import json
from importlib import resources

from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn


def transformer_blocks(unet: nn.Module) -> list[BasicTransformerBlock]:
    """The transformer blocks in forward order (down, mid, up): the paper's layers l = 1..L.

    `named_modules` would list the up blocks before the mid block (registration order),
    so the order is built from the U-Net's parts explicitly.
    """
    parts = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m for part in parts if part is not None for m in part.modules() if isinstance(m, BasicTransformerBlock)]


def grid_size(num_tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer with `num_tokens` tokens, given the latent's (H, W).

    Each U-Net downsampler (3x3 conv, stride 2, padding 1) maps a side s to ceil(s / 2).
    """
    h, w = latent_size
    while h * w > num_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens is no downsampled grid of a {latent_size} latent")
    return h, w


def unet_config_dict(unet: UNet2DConditionModel) -> dict:
    """The U-Net's config as a plain, JSON-able dict without diffusers' private keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}


def sdxl_unet_config() -> dict:
    """The SDXL base U-Net config (shipped, since nothing can be downloaded)."""
    return json.loads(resources.files("anystory.configs").joinpath("sdxl_unet.json").read_text())
