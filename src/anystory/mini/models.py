"""Builders for the mini world's tiny SDXL-shaped models, randomly initialised.

Same classes and topology as SDXL (KL VAE, CLIPTextModel + CLIPTextModelWithProjection
whose penultimate hidden states are concatenated for cross-attention and whose pooled
projection feeds `text_time` added conditioning, a U-Net of cross-attention transformer
blocks), shrunk so the whole base recipe trains in about an hour on one CPU thread.

Departures from SDXL, each for a reason:
- the VAE downsamples by 4, not 8: 64 x 64 images give 16 x 16 latents, so a 7 px
  pattern cell spans about two latent pixels;
- the U-Net has attention at its first level (16 x 16) too. SDXL skips attention there,
  but AnyStory's reference attention lives in the self-attention layers, and at 8 x 8
  one token covers 8 px, more than a pattern cell (5-7 px). It costs 1.5x the step time
  (0.67 vs 0.44 s at batch 64, one thread), which the detail-fidelity claim is worth;
- one ResNet + transformer per down level (SDXL has two) and one transformer layer per
  block: two per level cost 1.6x the step time;
- tokenizers stop at 32 tokens (the longest caption has 28);
- the vision encoder sees 16 x 16 crops in 4 x 4 patches: enough to tell shape and
  colour and, blurrily, one twin from another, too coarse to redraw the pattern.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ..utils.tokenizer import build_word_tokenizer
from .world import IMAGE_SIZE, VOCABULARY

MAX_TOKENS = 32
TEXT_WIDTHS = (32, 64)  # hidden sizes of text_encoder and text_encoder_2
POOLED_DIM = 64  # text_encoder_2 projection
TIME_EMBED_DIM = 8  # per SDXL time id (original size, crop, target size: 6 ids)
LATENT_CHANNELS = 4
VISION_SIZE = 16
# SDXL's scaled-linear DDPM betas: training noise and Karras-Euler sampling share them.
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def build_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Two identical CLIP tokenizers over the world's words (bos=0, eos=pad=1)."""
    return tuple(build_word_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS) for _ in range(2))


def build_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    vocab_size = len(build_tokenizers()[0])
    common = dict(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        max_position_embeddings=MAX_TOKENS, num_hidden_layers=3, num_attention_heads=4,
        hidden_act="gelu", layer_norm_eps=1e-5,
    )
    first, second = TEXT_WIDTHS
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=first, intermediate_size=4 * first, projection_dim=first, **common)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=second, intermediate_size=4 * second, projection_dim=POOLED_DIM, **common)
    )
    return text_encoder, text_encoder_2


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,  # measured: doubles the step time at 64 x 64
        force_upcast=False,
    )


def build_unet(block_out_channels: tuple[int, ...] = (32, 64, 128)) -> UNet2DConditionModel:
    """SDXL-shaped U-Net on 16 x 16 latents, with a transformer block at every level."""
    levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=tuple(c // 16 for c in block_out_channels),  # heads, SDXL-style
        transformer_layers_per_block=1,
        use_linear_projection=True,
        cross_attention_dim=sum(TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        norm_num_groups=16,
    )


def build_image_encoder() -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=4,
        num_attention_heads=4, image_size=VISION_SIZE, patch_size=4,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": VISION_SIZE},
        crop_size={"height": VISION_SIZE, "width": VISION_SIZE},
    )
    return CLIPVisionModelWithProjection(config), processor


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def build_sampling_scheduler() -> EulerDiscreteScheduler:
    """SDXL's sampler configuration with Karras sigmas (the paper's EDM-style sampling)."""
    return EulerDiscreteScheduler(
        **NOISE_SCHEDULE, timestep_spacing="leading", steps_offset=1, use_karras_sigmas=True
    )
