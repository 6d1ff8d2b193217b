"""Reference-prompted segmentation (paper §3.3): find given subjects in an existing image.

The router decides, at every cross-attention layer, which subject each latent position
belongs to. Run on a noised copy of a real image, one U-Net pass is enough to read where
each reference subject is: the image is VAE-encoded, noised to a chosen step, passed
once through the U-Net with the subjects' conditions (router on, maps recorded), and the
refined routing maps, averaged over layers and upsampled to the image, give one mask per
subject. No segmentation model is involved: only the trained router.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .models import AnyStoryState, SubjectEncodings
from .pipelines import RoutingMaps
from .pipelines.components import text_conditions
from .subject import Subject, SubjectError, load_image


@dataclass
class Segmentation:
    """Where each subject is in the image."""

    masks: torch.Tensor  # (N, H, W) bool at the image's size: subject i owns masks[i]
    maps: torch.Tensor  # (N+1, H, W) float: layer-averaged refined maps, entry N the background
    routing_maps: RoutingMaps  # every layer's maps as recorded (one step, batch 1)
    timestep: int  # the denoising timestep the image was noised to

    @property
    def labels(self) -> torch.Tensor:
        """(H, W) long: the owner of each pixel, N for the background."""
        return self.maps.argmax(dim=0)


@torch.no_grad()
def segment(
    pipe,
    image,
    subjects: Sequence[Subject] | SubjectEncodings,
    prompt: str = "",
    strength: float = 0.5,
    num_inference_steps: int = 25,
    resolution: int | None = None,
    generator: torch.Generator | None = None,
) -> Segmentation:
    """Masks of `subjects` in `image` from one routed U-Net pass of an `AnyStorySDXLPipeline`.

    strength: how far into the noise schedule the image is pushed, as img2img's strength
    (1 = pure noise); the step is picked from a `num_inference_steps` schedule.
    resolution: the longer side the image is processed at (default: the model's).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    picture = load_image(image, "image to segment").convert("RGB")
    encodings = subjects if isinstance(subjects, SubjectEncodings) else pipe.encode_subjects(subjects)
    if len(encodings) > pipe.adapter.config.max_subjects:
        raise SubjectError(f"{len(encodings)} subjects given; this adapter takes at most {pipe.adapter.config.max_subjects}")
    if not pipe.adapter.config.router_trained:
        warnings.warn("segmenting with an adapter whose router was never trained (stage 2)", stacklevel=2)
    height, width = working_size(picture.size, resolution or pipe.default_sample_size * pipe.vae_scale_factor)
    device, dtype = pipe._execution_device, pipe.unet.dtype

    latents = _encode_image(pipe, picture, height, width, device)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the pipeline's stays untouched
    scheduler.set_timesteps(num_inference_steps, device=device)
    timestep = scheduler.timesteps[min(round(num_inference_steps * (1 - strength)), num_inference_steps - 1)]
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    noisy = scheduler.scale_model_input(scheduler.add_noise(latents, noise, timestep.reshape(1)), timestep)

    state = AnyStoryState.from_encodings(
        encodings.to(device, dtype), batch_size=1, latent_size=tuple(latents.shape[-2:]),
        use_router=True, record_maps=True, reference_shift=pipe.adapter.config.reference_shift,
    )
    pipe.unet(noisy.to(dtype), timestep, cross_attention_kwargs={"anystory": state}, **text_conditions(pipe, prompt, (height, width), device))
    layers = sorted(state.recorded)
    maps = RoutingMaps(
        refined=[state.recorded[l].refined[None] for l in layers],
        coarse=[state.recorded[l].coarse[None] for l in layers],
    )
    soft = maps.mean("refined", size=(picture.height, picture.width))[0, 0]
    owner = soft.argmax(dim=0)
    masks = torch.stack([owner == i for i in range(len(encodings))])
    return Segmentation(masks=masks, maps=soft, routing_maps=maps, timestep=int(timestep))


def working_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(height, width) with the longer side at `resolution`, both multiples of 8."""
    width, height = size
    scale = resolution / max(width, height)
    return max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8)


def _encode_image(pipe, picture: Image.Image, height: int, width: int, device) -> torch.Tensor:
    """Scaled VAE latents of the image (the VAE upcast to float32 where fp16 would overflow)."""
    vae, original = pipe.vae, pipe.vae.dtype
    upcast = original == torch.float16 and vae.config.force_upcast
    pixels = pipe.image_processor.preprocess(picture, height=height, width=width)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode()
    finally:
        if upcast:
            vae.to(original)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(pipe.unet.dtype)
