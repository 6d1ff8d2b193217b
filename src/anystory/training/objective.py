"""The training loss of either stage, as one module that accelerate can wrap.

`AnyStoryObjective.forward(batch)` encodes the batch's subjects with the adapter (with
gradients for the parts being trained), lays them out per sample as an `AnyStoryState`,
runs the frozen U-Net with it and returns the losses. Only the adapter is a registered
submodule: DDP/FSDP/DeepSpeed wrap and synchronise just the adapter, while the frozen
SDXL parts are reached through the pipeline, held outside the module tree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..models import AnyStoryAdapter, AnyStoryState, RecordedMaps, SubjectEncodings
from ..models.routed_attention import routing_loss
from ..pipelines import AnyStorySDXLPipeline
from ..pipelines.components import clip_hidden_states, vae_latents
from ..subject import latent_mask


def pad_subjects(values: torch.Tensor, valid: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Per-subject rows (M, ...) of the valid entries -> (B, N, ...) with `fill` in the padding."""
    padded = fill.to(values.dtype).expand(*valid.shape, *values.shape[1:])
    return padded.index_put((valid,), values)


def routing_iou(
    recorded: dict[int, RecordedMaps], target_masks: torch.Tensor, valid: torch.Tensor, kind: str = "refined"
) -> float:
    """Mean IoU between each subject's hard routed region (`kind` maps: refined or coarse)
    and its ground-truth mask at the layer's own grid, over layers, samples and subjects."""
    target_masks, valid = target_masks.float().cpu(), valid.cpu()
    num_subjects = target_masks.shape[1]
    total, count = 0.0, 0
    for maps in recorded.values():
        owner = getattr(maps, kind).argmax(dim=1)
        routed = F.one_hot(owner, num_subjects + 1)[..., :num_subjects].permute(0, 3, 1, 2).bool()
        truth = F.interpolate(target_masks, size=owner.shape[-2:], mode="area") >= 0.5
        union = (routed | truth).sum(dim=(-2, -1))
        inter = (routed & truth).sum(dim=(-2, -1))
        counted = valid & (union > 0)
        total += (inter[counted] / union[counted]).sum().item()
        count += int(counted.sum())
    return total / max(count, 1)


class AnyStoryObjective(nn.Module):
    """Diffusion loss (+ routing loss in stage 2) of one batch."""

    def __init__(
        self,
        adapter: AnyStoryAdapter,
        pipeline: AnyStorySDXLPipeline,
        stage: int,
        null_subject_probability: float = 0.1,
        routing_loss_weight: float = 0.1,
        coarse_routing_loss_weight: float = 0.0,
        gumbel_tau: float = 1.0,
        timestep_range: tuple[int, int] | None = None,
        subject_loss_weight: float = 0.0,
        match_twins: bool = False,
        layout_routing: bool = False,
        sample_latents: bool = True,
    ):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.adapter = adapter
        self._pipeline = [pipeline]  # a list: frozen parts stay out of the module tree
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.stage = stage
        self.null_subject_probability = null_subject_probability if stage == 1 else 0.0
        self.routing_loss_weight = routing_loss_weight
        self.coarse_routing_loss_weight = coarse_routing_loss_weight
        self.gumbel_tau = gumbel_tau
        self.timestep_range = tuple(timestep_range or (0, self.noise_scheduler.config.num_train_timesteps))
        self.subject_loss_weight = subject_loss_weight
        self.match_twins = match_twins
        self.layout_routing = layout_routing and stage == 1
        self.sample_latents = sample_latents

    @property
    def pipeline(self) -> AnyStorySDXLPipeline:
        return self._pipeline[0]

    def forward(self, batch: dict, generator: torch.Generator, record_maps: bool = False) -> dict[str, torch.Tensor]:
        """Losses for `batch` (see transforms.collate); `generator` (CPU) draws the noise,
        timesteps and condition dropping. With `record_maps` (stage 2) also the routing IoU."""
        pipe = self.pipeline
        device = pipe.unet.device
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                batch["captions"], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            posterior_generator = generator if self.sample_latents else None
            latents = vae_latents(pipe.vae, batch["pixel_values"], posterior_generator).to(prompt_embeds.dtype)
        encodings = self.encode_subjects(batch)
        state = self.subject_state(batch, encodings, tuple(latents.shape[-2:]), generator, record_maps)

        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        scheduler = self.noise_scheduler
        timesteps = torch.randint(*self.timestep_range, (latents.shape[0],), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(
            noisy,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"].to(device, prompt_embeds.dtype)},
            cross_attention_kwargs={"anystory": state},
        ).sample
        error = (prediction.float() - self._target(latents, noise, timesteps).float()) ** 2
        losses = {"diffusion_loss": (error * self._pixel_weights(batch, error)).mean()}
        losses["loss"] = losses["diffusion_loss"]
        if self.stage == 2:
            groups = batch["subject_groups"] if self.match_twins else None
            losses["routing_loss"] = routing_loss(state.routing_errors, state.subject_valid, groups)
            losses["coarse_routing_loss"] = routing_loss(state.coarse_routing_errors, state.subject_valid, groups)
            losses["loss"] = (
                losses["loss"]
                + self.routing_loss_weight * losses["routing_loss"]
                + self.coarse_routing_loss_weight * losses["coarse_routing_loss"]
            )
            if record_maps:
                losses["routing_iou"] = torch.tensor(routing_iou(state.recorded, batch["target_masks"], batch["subject_valid"]))
        return losses

    @staticmethod
    def _teacher_layout(masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Stage 1's `layout_routing` (a deviation: the paper's stage 1 sees one subject,
        routed everywhere): each subject is routed to its own instance mask in the target,
        as stage 2's router will route it, so that the encoder learns to copy a subject
        beside others and only where it stands. A sample's single subject keeps the whole
        image (the paper's route); padding slots route nowhere."""
        alone = valid.sum(dim=1) == 1
        layout = masks.float().clone()
        layout[alone] = valid[alone][..., None, None].to(layout.dtype).expand_as(layout[alone])
        return layout

    def _pixel_weights(self, batch: dict, error: torch.Tensor) -> torch.Tensor | float:
        """1 everywhere, plus `subject_loss_weight` on the target's subject pixels (an
        extension, off by default: the paper's loss is the plain mean). Small subjects
        leave their fine detail a tiny share of a plain mean's gradient."""
        if not self.subject_loss_weight:
            return 1.0
        subjects = batch["target_masks"].float().amax(dim=1, keepdim=True).to(error.device)
        subjects = latent_mask(subjects, error.shape[-2:])
        return 1.0 + self.subject_loss_weight * subjects

    def _target(self, latents, noise, timesteps) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def encode_subjects(self, batch: dict) -> SubjectEncodings:
        """All valid subjects of the batch plus the null (all-zero) image, in one adapter call."""
        pipe = self.pipeline
        valid = batch["subject_valid"]
        clip_pixels = batch["clip_pixels"][valid]
        with torch.no_grad():
            states = clip_hidden_states(pipe.image_encoder, torch.cat([clip_pixels, torch.zeros_like(clip_pixels[:1])]))
            references = vae_latents(pipe.vae, batch["reference_pixels"][valid])
            masks = latent_mask(batch["reference_masks"][valid].to(references), references.shape[-2:])
        dtype = self.adapter.dtype
        size = batch["reference_pixels"].shape[-1]
        return self.adapter.encode(states.to(dtype), references.to(dtype), masks.to(dtype), (size, size))

    def subject_state(
        self, batch: dict, encodings: SubjectEncodings, latent_size: tuple[int, int],
        generator: torch.Generator, record_maps: bool = False,
    ) -> AnyStoryState:
        """Lay the encodings out per sample: padding slots are masked by `subject_valid`; in
        stage 1 a sample's CLIP condition becomes the null embedding with probability p."""
        valid = batch["subject_valid"].to(encodings.subject_tokens.device)
        batch_size, num_subjects = valid.shape
        null = encodings.null_tokens[0]
        tokens = pad_subjects(encodings.subject_tokens, valid, null)
        drop = torch.rand(batch_size, generator=generator) < self.null_subject_probability
        tokens = torch.where(drop.to(tokens.device)[:, None, None, None], null, tokens)
        tokens = torch.cat([tokens, null.expand(batch_size, 1, *null.shape)], dim=1)
        references = {
            layer: pad_subjects(g, valid, g.new_zeros(())) for layer, g in encodings.reference_states.items()
        }
        routing, layout = None, None
        if self.layout_routing:
            layout = self._teacher_layout(batch["target_masks"].to(tokens.device), valid)
        if self.stage == 2:
            background = encodings.background_routing
            routing = torch.cat([pad_subjects(encodings.routing_features, valid, background[0]), background.expand(batch_size, 1, -1)], dim=1)
        return AnyStoryState(
            subject_tokens=tokens,
            reference_states=references,
            latent_size=latent_size,
            routing_features=routing,
            layout_masks=layout,
            subject_valid=None if valid.all() else valid,
            target_masks=batch["target_masks"].to(tokens.device) if self.stage == 2 else None,
            gumbel_tau=self.gumbel_tau if self.stage == 2 else None,
            record_maps=record_maps and self.stage == 2,
        )
