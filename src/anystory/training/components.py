"""The frozen SDXL parts and the adapter that a training run starts from."""

from __future__ import annotations

import logging
from pathlib import Path

from ..models import AnyStoryAdapter
from ..pipelines.components import load_sdxl_components
from ..testing import tiny_sdxl_components
from .config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

TINY_ADAPTER_KWARGS = dict(
    num_subject_tokens=4, qformer_dim=32, qformer_depth=1, qformer_heads=2,
    routing_dim=32, router_dim=32, router_heads=2, reference_size=32,
)


def load_base_components(config: ModelConfig) -> dict:
    """SDXL components plus a CLIP vision encoder, from local paths (or the tiny test set)."""
    if config.base == "tiny":
        return tiny_sdxl_components(config.seed)
    if not Path(config.base).exists():
        raise ConfigError(f"model.base not found: {config.base} (an SDXL diffusers folder or single-file checkpoint)")
    if config.image_encoder is None or not (Path(config.image_encoder) / "config.json").exists():
        raise ConfigError(f"model.image_encoder must be a CLIP vision encoder folder, got {config.image_encoder!r}")
    extra = {"config": config.base_config} if config.base_config and Path(config.base).is_file() else {}
    return load_sdxl_components(config.base, config.image_encoder, **extra)


def load_adapter(config: ModelConfig, components: dict, stage: int) -> AnyStoryAdapter:
    """The adapter to train: loaded from `model.adapter`, or fresh from the U-Net (stage 1)."""
    if config.adapter is not None:
        adapter = AnyStoryAdapter.from_pretrained(config.adapter)
        return adapter.with_router_context(config.add_router_context) if config.add_router_context else adapter
    if stage == 2:
        logger.warning("stage 2 without model.adapter: the subject encoder is untrained (fine for tests only)")
    kwargs = dict(TINY_ADAPTER_KWARGS) if config.base == "tiny" else {}
    kwargs.setdefault("image_embed_dim", components["image_encoder"].config.hidden_size)
    kwargs.update(config.adapter_kwargs)
    return AnyStoryAdapter.from_unet(components["unet"], **kwargs)
