"""Tiny, randomly initialised SDXL-shaped components for tests, benchmarks and smoke runs.

Every piece has the real SDXL topology in miniature: two CLIP text encoders (the second
with a projection, feeding `text_time` added conditioning), a U-Net with down/mid/up
cross-attention transformer blocks, a KL VAE and a CLIP vision encoder. Nothing is
downloaded; a fixed seed gives fixed weights.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .utils.tokenizer import build_word_tokenizer

TINY_WORDS = (
    "a an the on in of and with at left right middle center photo picture red blue green "
    "yellow dog cat star mug vase teapot toy robot sitting standing beach forest city "
    "street room table snow grass background style watercolor"
).split()


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 16) -> UNet2DConditionModel:
    """SDXL's topology in miniature: three levels, no attention at the first, then attention
    at two resolutions (so routes are resampled between layers, as in SDXL)."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )


def tiny_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    common = dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=512,
        intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, projection_dim=16, **common))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=16, projection_dim=32, **common)
    )
    return text_encoder, text_encoder_2


def tiny_image_encoder(image_size: int = 32) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    config = CLIPVisionConfig(
        hidden_size=24, projection_dim=16, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=37, image_size=image_size, patch_size=8,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPVisionModelWithProjection(config), processor


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_sdxl_components(seed: int = 0) -> dict:
    """All components of a tiny SDXL pipeline plus a CLIP image encoder, from one seed."""
    torch.manual_seed(seed)
    unet = tiny_unet()
    vae = tiny_vae()
    text_encoder, text_encoder_2 = tiny_text_encoders()
    image_encoder, feature_extractor = tiny_image_encoder()
    tokenizer = build_word_tokenizer(TINY_WORDS)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1, use_karras_sigmas=True,
    )
    return dict(
        unet=unet, vae=vae, scheduler=scheduler,
        text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=build_word_tokenizer(TINY_WORDS),
        image_encoder=image_encoder, feature_extractor=feature_extractor,
    )
