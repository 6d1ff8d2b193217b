"""The mini world's evaluator, trained only on ground-truth renders.

Two small networks:
- a segmenter (fully convolutional) marks subject pixels and names the background;
  connected foreground components are the subject regions (subjects never touch in the
  world, so one component is one subject);
- a reader looks at one region (square crop around it, outside the region zeroed, the
  region's mask as a fourth channel) and reports shape, colour and the 9 pattern cells
  as they appear in the image.
A region's identity is then recognised among candidates by the likelihood of their
patterns (either way round: a flipped subject keeps its identity) under the read cells.
Positions come from the region's centroid, by thirds, as in the captions.

Nothing here ever sees a generated image: training data are world renders, blurred and
noised a little so that the networks tolerate VAE-like softness.

    python -m anystory.mini.evaluator [--weights DIR] [--count 1000]   # accuracy report
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .training import ResumableRun, batch_at
from .world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    MAX_SUBJECTS,
    PATTERN_BITS,
    POSITIONS,
    SHAPES,
    Identity,
    MiniWorld,
    Scene,
    WorldDataset,
    distractors,
    mirror_pattern,
    pattern_bits,
    to_tensor,
)

WEIGHTS = Path(__file__).parent / "weights" / "evaluator"
CROP_SIZE = 32
CROP_MARGIN = 0.1
MIN_REGION_PIXELS = 24
DISTRACTORS = 4
TRAINING_STEPS = 1000  # batch 32


# --------------------------------------------------------------------------- networks


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class Segmenter(nn.Module):
    """Per-pixel subject logit (full resolution) and background class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.full = _conv(3, 16)
        self.down = nn.Sequential(_conv(16, 32, 2), _conv(32, 32), _conv(32, 64, 2), _conv(64, 64))
        self.lift = nn.Conv2d(64, 16, 1)  # narrow before upsampling: full-size tensors are the cost
        self.foreground = nn.Sequential(
            nn.Conv2d(16 + 16, 16, 1), nn.ReLU(inplace=True), nn.Conv2d(16, 1, 3, padding=1)
        )
        self.background = nn.Linear(64, len(BACKGROUNDS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = self.full(images)
        coarse = self.down(full)
        up = F.interpolate(self.lift(coarse), size=full.shape[-2:], mode="bilinear", align_corners=False)
        foreground = self.foreground(torch.cat([full, up], 1))[:, 0]
        return foreground, self.background(coarse.mean((2, 3)))


class Reader(nn.Module):
    """Shape, colour and image-frame pattern-cell logits of one cropped region."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(4, 24), _conv(24, 48, 2), _conv(48, 48), _conv(48, 64, 2), _conv(64, 32),
            nn.Flatten(), nn.Linear(32 * (CROP_SIZE // 4) ** 2, 128), nn.ReLU(inplace=True),
        )
        self.heads = nn.Linear(128, len(SHAPES) + len(COLOURS) + PATTERN_BITS)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.heads(self.features(crops))
        return logits.split([len(SHAPES), len(COLOURS), PATTERN_BITS], dim=1)


def crop_regions(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Square crops (N, 4, S, S) around each mask's bounding box: the image zeroed
    outside the mask, then the mask. images (N, 3, H, W) in [-1, 1], masks (N, H, W)."""
    n, _, height, width = images.shape
    rows, cols = masks.any(2), masks.any(1)
    idx_h, idx_w = torch.arange(height).float(), torch.arange(width).float()
    top = torch.where(rows, idx_h, float("inf")).amin(1)
    bottom = torch.where(rows, idx_h, -1.0).amax(1) + 1
    left = torch.where(cols, idx_w, float("inf")).amin(1)
    right = torch.where(cols, idx_w, -1.0).amax(1) + 1
    half = torch.maximum(bottom - top, right - left) * (0.5 + CROP_MARGIN)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = half * 2 / width, half * 2 / height
    theta[:, 0, 2], theta[:, 1, 2] = cx * 2 / width - 1, cy * 2 / height - 1
    grid = F.affine_grid(theta, (n, 4, CROP_SIZE, CROP_SIZE), align_corners=False)
    stacked = torch.cat([images, masks[:, None].float()], 1)
    crops = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.cat([crops[:, :3] * crops[:, 3:], crops[:, 3:]], 1)


def label_components(foreground: torch.Tensor) -> list[torch.Tensor]:
    """8-connected components of a (H, W) boolean map, largest first, small ones dropped."""
    height, width = foreground.shape
    labels = torch.arange(1, height * width + 1, dtype=torch.float32).view(height, width) * foreground
    while True:
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * foreground
        if torch.equal(grown, labels):
            break
        labels = grown
    regions = [labels == value for value in labels.unique() if value > 0]
    regions = [r for r in regions if r.sum() >= MIN_REGION_PIXELS]
    return sorted(regions, key=lambda r: -int(r.sum()))


def position_of(mask: np.ndarray) -> str:
    """The caption position word of a region: the third holding its centroid."""
    centre = np.nonzero(mask)[1].mean() + 0.5
    return POSITIONS[min(int(centre * 3 // mask.shape[1]), 2)]


# --------------------------------------------------------------------------- evaluator


@dataclass
class RegionReading:
    """What the evaluator reads in one subject region."""

    mask: np.ndarray
    position: str
    shape: str
    colour: str
    cell_logits: np.ndarray  # (9,) image-frame pattern cells, > 0 means a light cell

    def pattern_log_likelihood(self, pattern: int) -> float:
        """log P(read cells | identity pattern), best of the pattern and its mirror image."""
        signs = torch.from_numpy(self.cell_logits)
        return max(
            float(F.logsigmoid(signs * (2 * torch.from_numpy(pattern_bits(p)).float() - 1)).sum())
            for p in (pattern, mirror_pattern(pattern))
        )

    def identify(self, candidates: Sequence[Identity]) -> int:
        """Index of the most likely candidate (captioned attributes are not used: the
        candidates are meant to share them, so only the pattern can decide)."""
        return int(np.argmax([self.pattern_log_likelihood(c.pattern) for c in candidates]))


@dataclass
class ImageReading:
    background: str
    regions: list[RegionReading]  # ordered left to right


class MiniEvaluator(nn.Module):
    """Finds subject regions in 64 x 64 images and reads their attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.segmenter, self.reader = Segmenter(), Reader()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike = WEIGHTS) -> "MiniEvaluator":
        path = Path(directory) / "model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no evaluator weights at {path}; train them with "
                                    "`python -m anystory.mini.recipe --phase evaluator`")
        evaluator = cls()
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
        evaluator.load_state_dict(state)
        return evaluator.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """fp16 weights (integer BatchNorm counters kept as they are)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {k: v.half() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        save_file(state, str(Path(directory) / "model.safetensors"))

    @torch.no_grad()
    def read(self, images) -> list[ImageReading]:
        """Find and read every subject of each image (PIL, uint8 HWC or float [0, 1] HWC)."""
        batch = _as_batch(images)
        foreground, background = self.segmenter(batch)
        masks, owners = [], []
        for i, fg in enumerate(foreground > 0):
            for region in label_components(fg):
                masks.append(region)
                owners.append(i)
        readings = [ImageReading(BACKGROUNDS[int(b)], []) for b in background.argmax(1)]
        if masks:
            regions = self.read_regions(batch[owners], torch.stack(masks))
            for owner, region in zip(owners, regions):
                readings[owner].regions.append(region)
        for reading in readings:
            reading.regions.sort(key=lambda r: np.nonzero(r.mask)[1].mean())
        return readings

    @torch.no_grad()
    def read_regions(self, images: torch.Tensor, masks: torch.Tensor) -> list[RegionReading]:
        """Read given regions: images (N, 3, H, W) in [-1, 1], masks (N, H, W) bool."""
        shape, colour, cells = self.reader(crop_regions(images, masks))
        return [
            RegionReading(
                mask=m.numpy(), position=position_of(m.numpy()), shape=SHAPES[int(s)],
                colour=COLOURS[int(c)], cell_logits=l.numpy(),
            )
            for m, s, c, l in zip(masks, shape.argmax(1), colour.argmax(1), cells)
        ]


def _as_batch(images) -> torch.Tensor:
    if isinstance(images, (Image.Image, np.ndarray)) and np.asarray(images).ndim == 3:
        images = [images]
    arrays = []
    for image in images:
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"the mini evaluator reads {IMAGE_SIZE}x{IMAGE_SIZE} RGB images, got {array.shape}")
        arrays.append(to_tensor(array))
    return torch.stack(arrays)


# --------------------------------------------------------------------------- training


class LabelledSceneDataset(WorldDataset):
    """1-3 subject scenes (a third with a same-attribute pair) with every label the
    evaluator learns: instance masks, background, and per subject shape, colour and
    image-frame pattern cells; padded to `MAX_SUBJECTS`."""

    stream = 5

    def scene(self, index: int) -> Scene:
        rng = self.rng(index)
        count = int(rng.integers(1, MAX_SUBJECTS + 1))
        subjects = self.world.sample_identities(rng, count, self.split, twin_prob=0.3)
        return self.world.sample_scene(rng, subjects)

    def __getitem__(self, index: int) -> dict:
        render = self.world.render(self.scene(index))
        count = len(render.masks)
        masks = np.zeros((MAX_SUBJECTS, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        masks[:count] = render.masks
        labels = np.zeros((MAX_SUBJECTS, 2 + PATTERN_BITS), dtype=np.int64)
        for k, p in enumerate(render.scene.placements):
            labels[k, 0], labels[k, 1] = SHAPES.index(p.identity.shape), COLOURS.index(p.identity.colour)
            labels[k, 2:] = pattern_bits(p.image_pattern)
        return {
            "image": to_tensor(render.image),
            "masks": torch.from_numpy(masks),
            "count": count,
            "background": BACKGROUNDS.index(render.scene.background),
            "labels": torch.from_numpy(labels),
        }


def _blur(images: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def soften(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Degrade renders the way a decoder might, per image: a random mix of one and two
    blur passes, half-resolution resampling, small colour gains and offsets, noise."""
    n = images.shape[0]

    def uniform(*shape):
        return torch.rand(n, *shape, generator=generator)

    once = _blur(images)
    weights = -uniform(3, 1, 1, 1).clamp_min(1e-6).log()  # Dirichlet(1, 1, 1) over the three
    weights = weights / weights.sum(1, keepdim=True)
    mixed = weights[:, 0] * images + weights[:, 1] * once + weights[:, 2] * _blur(once)
    half = F.interpolate(F.avg_pool2d(mixed, 2), scale_factor=2, mode="bilinear", align_corners=False)
    mixed = torch.where(uniform(1, 1, 1) < 0.3, half, mixed)
    gain, offset = 0.9 + 0.2 * uniform(3, 1, 1), 0.1 * (uniform(3, 1, 1) - 0.5)
    noise = torch.randn(images.shape, generator=generator) * 0.06 * uniform(1, 1, 1)
    return (mixed * gain + offset + noise).clamp(-1, 1)


def evaluator_loss(evaluator: MiniEvaluator, batch: dict, generator: torch.Generator) -> torch.Tensor:
    images = soften(batch["image"], generator)
    foreground, background = evaluator.segmenter(images)
    union = batch["masks"].any(1).float()
    loss = F.binary_cross_entropy_with_logits(foreground, union) + F.cross_entropy(background, batch["background"])
    real = torch.arange(MAX_SUBJECTS)[None] < batch["count"][:, None]
    owners = real.nonzero()[:, 0]
    masks, labels = batch["masks"][real], batch["labels"][real]
    shape, colour, cells = evaluator.reader(crop_regions(images[owners], masks))
    return (
        loss
        + F.cross_entropy(shape, labels[:, 0])
        + F.cross_entropy(colour, labels[:, 1])
        + F.binary_cross_entropy_with_logits(cells, labels[:, 2:].float()) * PATTERN_BITS / 3
    )


def train_evaluator(out: Path, max_steps: int | None = TRAINING_STEPS, minutes: float | None = None,
                    weights: Path | None = WEIGHTS, batch_size: int = 32, lr: float = 2e-3,
                    seed: int = 0) -> MiniEvaluator:
    """Train on training-identity renders, measure on held-out ones, save the weights."""
    evaluator = MiniEvaluator()
    optimizer = torch.optim.AdamW(evaluator.parameters(), lr=lr, weight_decay=1e-4)
    run = ResumableRun(out, {"evaluator": evaluator}, optimizer, max_steps=max_steps, minutes=minutes,
                       seed=seed, ema_decay=None, log_every=50)
    data = LabelledSceneDataset(MiniWorld(), seed=seed + 501)
    evaluator.train()
    while not run.done:
        run.optimize(evaluator_loss(evaluator, batch_at(data, run.step, batch_size), run.generator))
    run.save()
    evaluator.eval()
    report = measure_accuracy(evaluator)
    (out / "report.json").write_text(json.dumps({"step": run.step, **report}, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    if weights is not None:
        evaluator.save_pretrained(weights)
        (weights / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return evaluator


# --------------------------------------------------------------------------- accuracy


def measure_accuracy(evaluator: MiniEvaluator, count: int = 1000, seed: int = 12345, batch_size: int = 100,
                     transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Accuracy on held-out-identity ground-truth scenes of 1-3 subjects.

    identity: a ground-truth subject is found (a region with IoU >= 0.5) and recognised
    among itself and `DISTRACTORS` held-out identities of the same shape and colour, the
    true one at a random place in the list. `transform` maps the (B, H, W, 3) uint8
    renders before reading, e.g. a VAE round trip to measure what survives it.
    """
    data = LabelledSceneDataset(MiniWorld(), split="held_out", seed=seed)
    rng = np.random.default_rng(seed)
    hits = {key: [] for key in ("identity", "found", "shape", "colour", "position", "count")}
    backgrounds = []
    for start in range(0, count, batch_size):
        renders = [data.world.render(data.scene(i)) for i in range(start, min(start + batch_size, count))]
        images = np.stack([r.image for r in renders])
        readings = evaluator.read(transform(images) if transform else images)
        for render, reading in zip(renders, readings):
            backgrounds.append(reading.background == render.scene.background)
            hits["count"].append(len(reading.regions) == len(render.masks))
            for mask, placement in zip(render.masks, render.scene.placements):
                region = _best_match(mask, reading.regions)
                hits["found"].append(region is not None)
                if region is None:
                    hits["identity"].append(False)
                    continue
                candidates = distractors(placement.identity, DISTRACTORS, rng)
                truth = int(rng.integers(DISTRACTORS + 1))
                candidates.insert(truth, placement.identity)
                hits["identity"].append(region.identify(candidates) == truth)
                hits["shape"].append(region.shape == placement.identity.shape)
                hits["colour"].append(region.colour == placement.identity.colour)
                hits["position"].append(region.position == placement.position)
    report = {key: float(np.mean(values)) for key, values in hits.items()}
    report["background"] = float(np.mean(backgrounds))
    report["subjects"] = len(hits["found"])
    return report


def _best_match(mask: np.ndarray, regions: list[RegionReading], min_iou: float = 0.5) -> RegionReading | None:
    best, best_iou = None, min_iou
    for region in regions:
        iou = (mask & region.mask).sum() / (mask | region.mask).sum()
        if iou >= best_iou:
            best, best_iou = region, iou
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Accuracy of the mini evaluator on held-out ground truth.")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--count", type=int, default=1000, help="number of held-out scenes")
    parser.add_argument("--vae", type=Path, default=None, help="read VAE round trips of the renders instead")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transform = vae_round_trip(args.vae) if args.vae else None
    report = measure_accuracy(MiniEvaluator.from_pretrained(args.weights), args.count, transform=transform)
    print(json.dumps(report, indent=2))


def vae_round_trip(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """Encode (posterior mode) and decode uint8 images with a diffusers AutoencoderKL."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()

    @torch.no_grad()
    def round_trip(images: np.ndarray) -> np.ndarray:
        pixels = torch.stack([to_tensor(image) for image in images])
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    return round_trip


if __name__ == "__main__":
    main()
