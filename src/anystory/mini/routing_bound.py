"""How much of the routing claim the noise leaves to any router: a privileged segmenter.

The routing claim (`claims.routing_maps`) scores the router on a ground-truth scene
noised to each of the 25 sampling steps, each routed layer's hard map against the masks
at that layer's grid. A router reads the noised latent (through the U-Net) and each
subject's CLIP tokens, so at the first steps, where the latent is mostly noise, it can
only guess. This module asks how far the best reader of the same noised latent gets.

It trains a segmenter that is told more than any router: for each subject its captioned
shape and colour, its pattern in both orientations as bits (which the vision encoder
cannot see), and the thirds where the caption puts a subject of those attributes (twins
share both of theirs). Its input is the claim's own noised VAE latent with the noise
level as the timestep; its maps are inner products of per-position features with each
subject's code embedding, softmax over the subjects and the background (the router's
form, with a full U-Net as the feature extractor). It learns with cross-entropy on
training-identity scenes at the sampling schedule's sigmas, then is scored exactly as
the claim scores the router: the probabilities area-pooled to every routed layer's
grid, `routing_iou` there, on the claim's held-out scenes, per step and over all steps.
A trained segmenter bounds the best achievable IoU from below; what it misses at the
noisiest steps is what the latent no longer holds.

    python -m anystory.mini.routing_bound [--steps 4000] [--scenes 20000] [--count 200] [--threads 2]
        [--divisors 1,2,4,8] [--sides 16,8] [--segmenter runs/bound/segmenter.safetensors] [--out runs/bound]

`--sides` scores only the routed layers of those grid sides: what a U-Net without attention
at its coarsest level (as SDXL has none at its finest) would leave to its router.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from ..models import RecordedMaps
from ..models.topology import grid_size, transformer_blocks
from ..pipelines.components import vae_latents
from ..training import routing_iou
from . import WEIGHTS_DIR, load_pipeline
from .claims import SAMPLING, SEED, has_twins, routing_scenes
from .diagnostics import subject_cells
from .world import COLOURS, MAX_SUBJECTS, POSITIONS, SHAPES, Identity, MiniWorld, Render, mirror_pattern, pattern_bits, to_tensor

CODE_DIM = len(SHAPES) + len(COLOURS) + 2 * 9 + len(POSITIONS)
STEPS = SAMPLING["num_inference_steps"]


def subject_code(identity: Identity, cast: Sequence[Identity], positions: Sequence[str]) -> np.ndarray:
    """What the segmenter is told of a subject: shape, colour, the pattern's bits as drawn
    and mirrored (a flipped subject shows the mirror), and the thirds where the caption
    names a subject of this shape and colour (the caption cannot say which twin is where)."""
    code = np.zeros(CODE_DIM, np.float32)
    code[SHAPES.index(identity.shape)] = 1
    offset = len(SHAPES)
    code[offset + COLOURS.index(identity.colour)] = 1
    offset += len(COLOURS)
    code[offset:offset + 9] = pattern_bits(identity.pattern)
    code[offset + 9:offset + 18] = pattern_bits(mirror_pattern(identity.pattern))
    offset += 18
    for other, position in zip(cast, positions):
        if (other.shape, other.colour) == (identity.shape, identity.colour):
            code[offset + POSITIONS.index(position)] = 1
    return code


@dataclass
class Scenes:
    """Scenes as the segmenter reads them; subject slots past `counts` are padding."""

    latents: torch.Tensor  # (B, 4, h, w) scaled VAE latents of the clean scenes
    labels: torch.Tensor  # (B, h, w) long: the owner of each latent cell, MAX_SUBJECTS for the background
    codes: torch.Tensor  # (B, MAX_SUBJECTS, CODE_DIM)
    counts: torch.Tensor  # (B,) subjects per scene
    masks: list[torch.Tensor]  # per scene (N, H, W) bool at image size, left to right
    twins: list[bool]  # does the scene hold two subjects of one shape and colour?


def owner_labels(masks: np.ndarray, side: int) -> torch.Tensor:
    """The latent grid's owner of each cell (area >= 0.5, as `routing_iou` reads the masks),
    MAX_SUBJECTS for the background."""
    labels = torch.full((side * side,), MAX_SUBJECTS, dtype=torch.long)
    for index, cells in enumerate(subject_cells(masks, side)):
        labels[torch.from_numpy(cells)] = index
    return labels.reshape(side, side)


@torch.no_grad()
def encode_scenes(renders: Sequence[Render], vae, chunk: int = 256) -> Scenes:
    latents = torch.cat([vae_latents(vae, torch.stack([to_tensor(r.image) for r in renders[i:i + chunk]]))
                         for i in range(0, len(renders), chunk)])
    codes = torch.zeros(len(renders), MAX_SUBJECTS, CODE_DIM)
    for row, render in enumerate(renders):
        cast = [p.identity for p in render.scene.placements]
        positions = [p.position for p in render.scene.placements]
        for index, identity in enumerate(cast):
            codes[row, index] = torch.from_numpy(subject_code(identity, cast, positions))
    return Scenes(
        latents=latents.float(),
        labels=torch.stack([owner_labels(r.masks, latents.shape[-1]) for r in renders]),
        codes=codes,
        counts=torch.tensor([len(r.scene.placements) for r in renders]),
        masks=[torch.from_numpy(r.masks) for r in renders],
        twins=[has_twins([p.identity for p in r.scene.placements]) for r in renders],
    )


def training_renders(world: MiniWorld, count: int, seed: int = 1) -> list[Render]:
    """Scenes of 2-3 training identities, half with twins: the routing claim's mix."""
    rng = np.random.default_rng(seed)
    renders = []
    for _ in range(count):
        cast = world.sample_identities(rng, int(rng.integers(2, MAX_SUBJECTS + 1)), "train", twin_prob=0.5)
        renders.append(world.render(world.sample_scene(rng, cast)))
    return renders


class PrivilegedSegmenter(nn.Module):
    """A diffusers U-Net on the noised latent (noise level as its timestep) gives each
    position a feature; each subject's code, through an MLP, and a learned background
    token give the queries; maps are their scaled inner products."""

    def __init__(self, latent_channels: int = 4, dim: int = 64, channels: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        self.features = UNet2DModel(
            in_channels=latent_channels, out_channels=dim, block_out_channels=channels,
            down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels),
            layers_per_block=1, norm_num_groups=16,
        )
        self.subject = nn.Sequential(nn.Linear(CODE_DIM, 128), nn.SiLU(), nn.Linear(128, dim))
        self.background = nn.Parameter(torch.zeros(dim))

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, codes: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """Logits (B, MAX_SUBJECTS + 1, h, w); padded subject slots never win."""
        features = self.features(noisy, timesteps).sample
        queries = torch.cat([self.subject(codes), self.background.expand(len(codes), 1, -1)], dim=1)
        logits = torch.einsum("bkd,bdhw->bkhw", queries, features) / queries.shape[-1] ** 0.5
        padded = torch.arange(MAX_SUBJECTS + 1, device=counts.device)[None] >= counts[:, None]
        padded[:, MAX_SUBJECTS] = False
        return logits.masked_fill(padded[..., None, None], -1e4)


@dataclass
class Schedule:
    """The sampling schedule's noise levels, step 0 the noisiest, as `segment` applies them."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def of(cls, pipe, steps: int = STEPS) -> "Schedule":
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return cls(scheduler.sigmas[:steps].float(), scheduler.timesteps[:steps].float())

    def divided(self, divisor: float, alphas_cumprod: torch.Tensor) -> "Schedule":
        """The same steps at sigma / divisor: the noise a subject of the same share of the
        image has on its mean when it covers divisor^2 times the latent cells (a latent
        `divisor` times wider). Timesteps by log-sigma interpolation of the training schedule."""
        alphas = alphas_cumprod.double()
        train_sigmas = ((1 - alphas) / alphas).sqrt().log().numpy()
        sigmas = self.sigmas / divisor
        timesteps = np.interp(sigmas.log().numpy(), train_sigmas, np.arange(len(train_sigmas)))
        return Schedule(sigmas, torch.tensor(timesteps, dtype=torch.float32))

    def noised(self, latents: torch.Tensor, steps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler's add_noise then scale_model_input: (x + sigma eps) / sqrt(sigma^2 + 1)."""
        sigma = self.sigmas[steps][:, None, None, None]
        noise = torch.randn(latents.shape, generator=generator)
        return (latents + sigma * noise) / (sigma**2 + 1).sqrt()


def routed_grids(unet, latent_side: int) -> list[int]:
    """The grid side of every routed (cross-attention) layer, in forward order."""
    sides, hooks = [], []
    for block in transformer_blocks(unet):
        hooks.append(block.attn2.register_forward_pre_hook(
            lambda _m, args: sides.append(grid_size(args[0].shape[1], (latent_side, latent_side))[0])))
    config = unet.config
    try:
        with torch.no_grad():
            sample = torch.zeros(1, config.in_channels, latent_side, latent_side, dtype=unet.dtype)
            added = {"text_embeds": torch.zeros(1, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim, dtype=unet.dtype),
                     "time_ids": torch.zeros(1, 6, dtype=unet.dtype)}
            unet(sample, 0, encoder_hidden_states=torch.zeros(1, 1, config.cross_attention_dim, dtype=unet.dtype),
                 added_cond_kwargs=added)
    finally:
        for hook in hooks:
            hook.remove()
    return sides


def layers_of_sides(grids: Sequence[int], sides: str | None) -> list[int]:
    """The routed layers' grids kept by a comma-separated list of sides (all when None)."""
    if sides is None:
        return list(grids)
    wanted = {int(side) for side in sides.split(",")}
    if not wanted & set(grids):
        raise ValueError(f"--sides {sides}: no routed layer has such a grid; the U-Net's are {sorted(set(grids))}")
    return [side for side in grids if side in wanted]


def train_segmenter(model: PrivilegedSegmenter, scenes: Scenes, schedule: Schedule, steps: int,
                    batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0, log_every: int = 250) -> list[float]:
    """Cross-entropy at steps of the schedule drawn uniformly, as the claim weighs them."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    losses, start = [], time.time()
    model.train()
    for step in range(steps):
        rows = torch.randint(len(scenes.latents), (batch_size,), generator=generator)
        at = torch.randint(len(schedule.sigmas), (batch_size,), generator=generator)
        noisy = schedule.noised(scenes.latents[rows], at, generator)
        logits = model(noisy, schedule.timesteps[at], scenes.codes[rows], scenes.counts[rows])
        loss = F.cross_entropy(logits, scenes.labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step}: loss {np.mean(losses[-log_every:]):.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    return losses


@dataclass
class Bound:
    count: int
    mean: float  # the claim's headline measure: mean over scenes and steps
    per_step: list[float] = field(default_factory=list)  # step 0 = most noise
    by_scene: dict[str, float] = field(default_factory=dict)  # scenes with / without twins


@torch.no_grad()
def score(model: PrivilegedSegmenter, scenes: Scenes, schedule: Schedule, grids: Sequence[int], seed: int = SEED) -> Bound:
    """The claim's measure on the segmenter's maps: each routed layer's grid gets the
    probabilities area-pooled to it, and `routing_iou` reads its hard map there."""
    generator = torch.Generator().manual_seed(seed)
    per_step, by_scene = [], {"with twins": [], "without twins": []}
    for step in range(len(schedule.sigmas)):
        at = torch.full((len(scenes.latents),), step)
        noisy = schedule.noised(scenes.latents, at, generator)
        probs = model(noisy, schedule.timesteps[at], scenes.codes, scenes.counts).softmax(dim=1)
        values = []
        for row, (masks, twins) in enumerate(zip(scenes.masks, scenes.twins)):
            count = len(masks)
            kept = torch.cat([probs[row:row + 1, :count], probs[row:row + 1, MAX_SUBJECTS:]], dim=1)
            recorded = {layer: RecordedMaps(coarse=pooled, refined=pooled)
                        for layer, pooled in enumerate(F.adaptive_avg_pool2d(kept, side) for side in grids)}
            values.append(routing_iou(recorded, masks[None], torch.ones(1, count, dtype=torch.bool)))
            by_scene["with twins" if twins else "without twins"].append(values[-1])
        per_step.append(float(np.mean(values)))
    return Bound(len(scenes.masks), float(np.mean(per_step)), per_step, {k: float(np.mean(v)) for k, v in by_scene.items() if v})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder holding base/ (its VAE, U-Net and sampler)")
    parser.add_argument("--steps", type=int, default=4000, help="segmenter training steps (batch 64)")
    parser.add_argument("--scenes", type=int, default=20000, help="training-identity scenes to learn from")
    parser.add_argument("--count", type=int, default=200, help="the routing claim's held-out scenes to score")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--divisors", default="1", help="also score at sigma / d for each d (comma-separated): "
                        "the noise of a latent d times wider")
    parser.add_argument("--sides", help="score only the routed layers of these grid sides (comma-separated; default all)")
    parser.add_argument("--segmenter", type=Path, help="score this trained segmenter.safetensors instead of training one")
    parser.add_argument("--out", type=Path, default=Path("runs/bound"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = load_pipeline(weights=args.weights)
    world, schedule = MiniWorld(), Schedule.of(pipe)
    grids = layers_of_sides(routed_grids(pipe.unet, pipe.default_sample_size), args.sides)
    model = PrivilegedSegmenter(latent_channels=pipe.vae.config.latent_channels)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.segmenter:
        model.load_state_dict(load_file(str(args.segmenter)))
        model.eval()
    else:
        train_segmenter(model, encode_scenes(training_renders(world, args.scenes), pipe.vae), schedule, args.steps)
        save_file(model.state_dict(), str(args.out / "segmenter.safetensors"))
    held_out = encode_scenes([world.render(group.scenes[0]) for group in routing_scenes(args.count)], pipe.vae)
    bounds = {}
    for divisor in (float(d) for d in args.divisors.split(",")):
        at = schedule if divisor == 1 else schedule.divided(divisor, pipe.scheduler.alphas_cumprod)
        bounds[f"sigma / {divisor:g}"] = bound = score(model, held_out, at, grids)
        print(f"sigma / {divisor:g}:", json.dumps({"mean": round(bound.mean, 3), "by_scene": {k: round(v, 3) for k, v in bound.by_scene.items()},
                                                  "per_step": [round(v, 3) for v in bound.per_step]}), flush=True)
    (args.out / "bound.json").write_text(json.dumps({"grids": grids, **{k: asdict(b) for k, b in bounds.items()}}, indent=2))


if __name__ == "__main__":
    main()
