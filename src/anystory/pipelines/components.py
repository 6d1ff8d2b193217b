"""The frozen SDXL parts AnyStory reads from: loading them from local paths, and the two
encodings of reference pixels (CLIP hidden states, VAE latents) that inference and
training share."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection


def load_sdxl_components(
    base: str | os.PathLike,
    image_encoder: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    **base_kwargs,
) -> dict:
    """SDXL components plus a CLIP vision encoder and its processor, from local paths only.

    base: an SDXL diffusers folder or a single-file checkpoint (pass `config=` a local SDXL
    folder for single files, since nothing is downloaded)."""
    base = Path(base)
    if not base.exists():
        raise FileNotFoundError(f"SDXL checkpoint not found: {base}")
    load = StableDiffusionXLPipeline.from_single_file if base.is_file() else StableDiffusionXLPipeline.from_pretrained
    sdxl = load(str(base), torch_dtype=torch_dtype, local_files_only=True, **base_kwargs)
    encoder_path = Path(image_encoder)
    if not (encoder_path / "config.json").exists():
        raise FileNotFoundError(f"no CLIP vision encoder (config.json) in {encoder_path}")
    components = {k: v for k, v in sdxl.components.items() if k not in ("image_encoder", "feature_extractor")}
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_path, torch_dtype=torch_dtype)
    components["image_encoder"] = encoder
    components["feature_extractor"] = _image_processor(encoder_path, sdxl.components.get("feature_extractor"), encoder)
    return components


def _image_processor(encoder_path: Path, bundled, encoder) -> CLIPImageProcessor:
    """The encoder's own processor, else the SDXL folder's, else CLIP's defaults at the
    encoder's input size; one whose crop size disagrees with the encoder is refused."""
    if (encoder_path / "preprocessor_config.json").exists():
        processor = CLIPImageProcessor.from_pretrained(encoder_path)
    elif bundled is not None:
        processor = bundled
    else:
        side = encoder.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if processor.crop_size["height"] != encoder.config.image_size:
        raise ValueError(
            f"the CLIP image processor crops to {processor.crop_size['height']} px but the encoder in "
            f"{encoder_path} takes {encoder.config.image_size} px"
        )
    return processor


def clip_hidden_states(image_encoder: CLIPVisionModelWithProjection, pixels: torch.Tensor) -> torch.Tensor:
    """Penultimate CLIP hidden states (Eq. 2's input): (B, tokens, width)."""
    out = image_encoder(pixels.to(image_encoder.device, image_encoder.dtype), output_hidden_states=True)
    return out.hidden_states[-2]


def vae_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled VAE latents of pixels in [-1, 1]: a posterior sample with `generator` (training
    targets), else its mode (references). A float16 VAE that asks for it runs in float32."""
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    try:
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mode()
    finally:
        if upcast:
            vae.to(torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def text_conditions(pipe: StableDiffusionXLPipeline, prompt: str | list[str], size: tuple[int, int], device) -> dict:
    """The U-Net's text inputs for `prompt` (one row per prompt, no classifier-free
    guidance): for single U-Net passes outside the sampling loop (segmentation, probes)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    )
    return {
        "encoder_hidden_states": embeds,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device).expand(embeds.shape[0], -1)},
    }
