"""`AnyStorySDXLPipeline`: SDXL text-to-image with any number of reference subjects.

It is diffusers' `StableDiffusionXLPipeline` plus an `AnyStoryAdapter`. The subjects are
encoded once per call (CLIP + QFormers + ReferenceNet), laid out for both CFG branches
and handed to the routed attention processors through `cross_attention_kwargs`, so the
denoising loop, schedulers, LoRA loading and CPU offload are diffusers' own. With no
subjects the output is exactly the base pipeline's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..models import AnyStoryAdapter, AnyStoryState, SubjectEncodings
from ..subject import Subject, SubjectError, latent_mask
from .components import clip_hidden_states, load_sdxl_components, vae_latents


@dataclass
class RoutingMaps:
    """Soft routing maps over denoising steps, for the conditional rows of the batch.

    `refined[l]` and `coarse[l]` hold layer l's maps, (steps, B, N+1, h_l, w_l): entry i < N
    is subject i, entry N the background; each sums to one over the N+1 entries.
    """

    refined: list[torch.Tensor] = field(default_factory=list)
    coarse: list[torch.Tensor] = field(default_factory=list)

    def mean(self, kind: str = "refined", size: tuple[int, int] | None = None) -> torch.Tensor:
        """Layer-averaged maps, (steps, B, N+1, H, W), resampled to `size` (default: the finest layer's)."""
        maps = getattr(self, kind)
        if not maps:
            raise ValueError("no routing maps were recorded")
        size = size or max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        resized = [F.interpolate(m.flatten(0, 1), size=tuple(size), mode="bilinear").unflatten(0, m.shape[:2]) for m in maps]
        return torch.stack(resized).mean(dim=0)

    def hard(self, kind: str = "refined", size: tuple[int, int] | None = None) -> torch.Tensor:
        """One-hot argmax of `mean`: which subject (or background) owns each position."""
        soft = self.mean(kind, size)
        return F.one_hot(soft.argmax(dim=2), soft.shape[2]).permute(0, 1, 4, 2, 3).to(soft.dtype)


@dataclass
class AnyStoryPipelineOutput(StableDiffusionXLPipelineOutput):
    routing_maps: RoutingMaps | None = None


class AnyStorySDXLPipeline(StableDiffusionXLPipeline):
    """SDXL + AnyStory. `__call__` takes `subjects` (a list of `Subject` or precomputed
    `SubjectEncodings`) on top of every `StableDiffusionXLPipeline` argument."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->adapter->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        image_encoder: CLIPVisionModelWithProjection,
        feature_extractor: CLIPImageProcessor,
        adapter: AnyStoryAdapter,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(adapter=adapter)
        adapter.attach(unet)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save every component; the U-Net is saved as the plain base (adapter detached),
        the adapter in its own folder, so `from_pretrained` rebuilds the same pipeline."""
        self.adapter.detach(self.unet)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.adapter.attach(self.unet)

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike | AnyStoryAdapter,
        image_encoder: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        karras_sigmas: bool = True,
        **base_kwargs,
    ) -> "AnyStorySDXLPipeline":
        """Assemble from local paths (see `load_sdxl_components`) and an adapter folder.
        Uses Euler with Karras sigmas (the paper's EDM-style sampling) unless `karras_sigmas=False`."""
        components = load_sdxl_components(base, image_encoder, torch_dtype, **base_kwargs)
        if not isinstance(adapter, AnyStoryAdapter):
            adapter = AnyStoryAdapter.from_pretrained(adapter, torch_dtype=torch_dtype)
        if karras_sigmas:
            components["scheduler"] = EulerDiscreteScheduler.from_config(components["scheduler"].config, use_karras_sigmas=True)
        return cls(**components, adapter=adapter)

    # -- subjects -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_subjects(self, subjects: Sequence[Subject]) -> SubjectEncodings:
        """CLIP tokens, routing features and ReferenceNet states of every subject, computed
        once; pass the result (or a `.select(...)` of it) as `subjects=` to reuse it across
        calls (a storyboard encodes its whole cast once, however large)."""
        subjects = list(subjects)
        if not subjects:
            raise SubjectError("encode_subjects needs at least one subject")
        if not all(isinstance(s, Subject) for s in subjects):
            raise SubjectError("subjects must be anystory.Subject objects (Subject(image, mask))")
        device = self._execution_device
        dtype = self.adapter.dtype
        clip_states = self._clip_states(subjects, device).to(dtype)
        references = (None, None, None)
        if self.adapter.reference_net is not None:
            latents, masks, size = self._reference_latents(subjects, device)
            references = (latents.to(dtype), masks.to(dtype), (size, size))
        encodings = self.adapter.encode(clip_states, *references, [s.name for s in subjects])
        if not torch.isfinite(encodings.subject_tokens).all():
            raise FloatingPointError("subject encoding produced NaN/inf; try torch_dtype=torch.float32 or bfloat16")
        return encodings

    def _clip_states(self, subjects: list[Subject], device) -> torch.Tensor:
        """Penultimate CLIP hidden states of each segmented subject, plus the all-zero image last."""
        extractor = self.feature_extractor
        size = extractor.crop_size["height"]
        pixels = torch.stack([s.clip_pixels(size, extractor.image_mean, extractor.image_std) for s in subjects])
        return clip_hidden_states(self.image_encoder, torch.cat([pixels, torch.zeros_like(pixels[:1])]).to(device))

    def _reference_latents(self, subjects: list[Subject], device):
        """VAE latents of the segmented references and their masks at latent size."""
        size = self.adapter.config.reference_size
        pixels, masks = map(torch.stack, zip(*(s.reference_pixels(size) for s in subjects)))
        latents = vae_latents(self.vae, pixels.to(device))
        return latents, latent_mask(masks.to(device), latents.shape[-2:]), size

    # -- generation -----------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        subjects: Sequence[Subject] | SubjectEncodings | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        subject_scale: float = 1.0,
        reference_shift: float | None = None,
        unconditional_references: bool | None = None,
        use_router: bool | None = None,
        subject_masks: Sequence | torch.Tensor | None = None,
        subject_steps: tuple[float, float] = (0.0, 1.0),
        return_routing_maps: bool = False,
        **kwargs,
    ) -> AnyStoryPipelineOutput | tuple:
        """Generate with subjects. Beyond `StableDiffusionXLPipeline.__call__`:

        subjects: references (list of `Subject`) or `encode_subjects` output; none -> plain SDXL.
        subject_scale: eta, strength of the CLIP subject condition (Eq. 5).
        reference_shift: gamma, added to the reference-attention logits (Eq. 8); default:
            the value calibrated for this adapter (`adapter.config.reference_shift`).
        unconditional_references: whether the CFG unconditional branch keeps the reference
            attention and routing (DESIGN §1's choice) or holds
            no subject, so that guidance amplifies the references too (IP-Adapter's
            choice); default: the adapter's `unconditional_references`.
        use_router: route subjects to regions (default: when the adapter's router was
            trained). Off, all subjects act everywhere (the paper's blending baseline).
        subject_masks: optional layout, one mask per subject (H x W at output size), which
            replaces the router for users who want to place subjects themselves.
        subject_steps: fraction of the denoising steps (start, end) where subjects act.
        return_routing_maps: also return the router's maps over steps and layers.
        """
        return_dict = kwargs.pop("return_dict", True)
        if subjects is None or (not isinstance(subjects, SubjectEncodings) and len(subjects) == 0):
            output = super().__call__(
                prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs
            )
            return AnyStoryPipelineOutput(images=output.images) if return_dict else (output.images,)
        limit = self.adapter.config.max_subjects
        if len(subjects) > limit:
            raise SubjectError(f"{len(subjects)} subjects given; this adapter is configured for at most {limit} per image")
        encodings = subjects if isinstance(subjects, SubjectEncodings) else self.encode_subjects(subjects)
        if "cross_attention_kwargs" in kwargs and "anystory" in (kwargs["cross_attention_kwargs"] or {}):
            raise ValueError("cross_attention_kwargs['anystory'] is set by the pipeline; pass subjects instead")
        state = self._prepare_state(
            prompt, encodings, kwargs, guidance_scale, subject_scale, reference_shift,
            unconditional_references, use_router, subject_masks, return_routing_maps,
        )
        recorder = _StepTracker(state, num_inference_steps, subject_steps, kwargs.pop("callback_on_step_end", None))
        tensor_inputs = list(kwargs.pop("callback_on_step_end_tensor_inputs", ["latents"]))
        kwargs["cross_attention_kwargs"] = {**(kwargs.get("cross_attention_kwargs") or {}), "anystory": state}
        output = super().__call__(
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            callback_on_step_end=recorder,
            callback_on_step_end_tensor_inputs=sorted(set(tensor_inputs) | {"latents"}),
            **kwargs,
        )
        maps = recorder.maps if return_routing_maps else None
        if return_dict:
            return AnyStoryPipelineOutput(images=output.images, routing_maps=maps)
        return (output.images, maps)

    def _prepare_state(
        self, prompt, encodings, kwargs, guidance_scale, subject_scale, reference_shift,
        unconditional_references, use_router, subject_masks, record_maps,
    ) -> AnyStoryState:
        rows = self._batch_rows(prompt, kwargs)
        cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
        width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if reference_shift is None:
            reference_shift = self.adapter.config.reference_shift
        if unconditional_references is None:
            unconditional_references = self.adapter.config.unconditional_references
        if use_router is None:
            use_router = self.adapter.config.router_trained
        elif use_router and not self.adapter.config.router_trained:
            warnings.warn("use_router=True with an adapter whose router was never trained (stage 2)", stacklevel=3)
        layout = None
        if subject_masks is not None:
            layout = _layout_masks(subject_masks, encodings.num_subjects, (height, width)).expand(rows * (1 + cfg), -1, -1, -1)
        device, dtype = self._execution_device, self.unet.dtype
        return AnyStoryState.from_encodings(
            encodings.to(device, dtype),
            batch_size=rows * (2 if cfg else 1),
            latent_size=latent_size,
            unconditional_rows=rows if cfg else 0,
            use_router=use_router,
            unconditional_references=unconditional_references,
            layout_masks=None if layout is None else layout.to(device, dtype),
            subject_scale=subject_scale,
            reference_shift=reference_shift,
            record_maps=record_maps and use_router and layout is None,
            cache_projections=True,
        )

    @staticmethod
    def _batch_rows(prompt, kwargs) -> int:
        """Rows of the conditional batch, as StableDiffusionXLPipeline will build it."""
        if prompt is not None:
            count = 1 if isinstance(prompt, str) else len(prompt)
        elif kwargs.get("prompt_embeds") is not None:
            count = kwargs["prompt_embeds"].shape[0]
        else:
            raise ValueError("give a prompt or prompt_embeds")
        return count * (kwargs.get("num_images_per_prompt") or 1)


class _StepTracker:
    """Per-step bookkeeping through diffusers' `callback_on_step_end`: switch the subject
    conditions on the chosen step window, collect routing maps, catch NaNs early."""

    def __init__(self, state: AnyStoryState, num_steps: int, window: tuple[float, float], user_callback=None):
        start, end = window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"subject_steps must satisfy 0 <= start < end <= 1, got {window}")
        self.state, self.num_steps, self.window, self.user_callback = state, num_steps, window, user_callback
        self._refined: dict[int, list[torch.Tensor]] = {}
        self._coarse: dict[int, list[torch.Tensor]] = {}
        self.state.active = self._in_window(0)

    @property
    def maps(self) -> RoutingMaps:
        layers = sorted(self._refined)
        return RoutingMaps(
            refined=[torch.stack(self._refined[l]) for l in layers],
            coarse=[torch.stack(self._coarse[l]) for l in layers],
        )

    def _in_window(self, step: int) -> bool:
        start, end = self.window
        return start <= step / self.num_steps < end

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if not torch.isfinite(callback_kwargs["latents"]).all():
            raise FloatingPointError(
                f"NaN/inf in the latents at step {step}; in float16 try torch_dtype=torch.bfloat16 or float32"
            )
        self._collect_maps()
        self.state.active = self._in_window(step + 1)
        if self.user_callback is not None:
            callback_kwargs = self.user_callback(pipe, step, timestep, callback_kwargs) or callback_kwargs
        return callback_kwargs

    def _collect_maps(self) -> None:
        """Keep this step's maps of the conditional rows, layer by layer."""
        rows = slice(self.state.unconditional_rows, None)
        for layer, maps in self.state.recorded.items():
            self._refined.setdefault(layer, []).append(maps.refined[rows])
            self._coarse.setdefault(layer, []).append(maps.coarse[rows])
        self.state.recorded.clear()


def _layout_masks(masks, num_subjects: int, size: tuple[int, int]) -> torch.Tensor:
    """User layout masks -> (1, N, H, W) float, validated against the subjects and output size."""
    if isinstance(masks, torch.Tensor):
        stacked = masks.float()
        if stacked.ndim == 4 and stacked.shape[0] == 1:
            stacked = stacked[0]
    else:
        arrays = [np.asarray(m.convert("L") if isinstance(m, Image.Image) else m, dtype=np.float32) for m in masks]
        stacked = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0)
        if stacked.numel() and stacked.max() > 1:
            stacked = stacked / 255.0
    if stacked.ndim != 3 or stacked.shape[0] != num_subjects:
        raise ValueError(f"subject_masks must hold one (H, W) mask per subject ({num_subjects}), got shape {tuple(stacked.shape)}")
    if tuple(stacked.shape[-2:]) != tuple(size):
        raise ValueError(f"subject_masks are {tuple(stacked.shape[-2:])}, the output is {tuple(size)}")
    return stacked[None]
