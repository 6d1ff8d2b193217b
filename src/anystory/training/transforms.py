"""From a `Record` to training tensors.

Target side: aspect-ratio bucket, resize-to-cover and crop, with SDXL's
micro-conditioning (original size, crop top-left, target size) recorded as `time_ids`.
Reference side: each subject goes through the core `Subject` preprocessing (segment,
square crop, resize) plus a random affine augmentation (rotation, scale: zero-padding
below 1 and cropping above, shift) applied to the crop, identically for its CLIP view and
its ReferenceNet view. Stage 2 records carry no references: they are cut from the target
image's own instances before the target is cropped, so each reference is whole.

All randomness comes from the generator passed in, seeded per sample by the loader, so
a sample looks the same whichever worker or process prepares it (exact resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..subject import Subject, SubjectError
from .data import Record, SampleError


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets with about resolution**2 pixels, sides multiples of `step`."""
    area = resolution * resolution
    buckets = set()
    for height in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        width = area // height // step * step
        if width >= step and max(height, width) / min(height, width) <= max_ratio:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> int:
    """Index of the bucket whose aspect ratio is closest (in log scale) to the image's."""
    ratio = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


class AugmentedSubject(Subject):
    """A `Subject` whose square crop gets a fixed random affine: rotation, scale, shift.

    Outside the source crop is filled with zeros (so with the mask too), which is the
    zero-padding of the paper's reference augmentation.
    """

    def __init__(self, image, mask, angle: float, scale: float, shift: tuple[float, float]):
        super().__init__(image, mask)
        self.angle, self.scale, self.shift = angle, scale, shift

    def cropped(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, mask = super().cropped(size)
        both = torch.cat([pixels, mask])[None]
        cos, sin = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        theta = torch.tensor(
            [[cos / self.scale, -sin / self.scale, self.shift[0]], [sin / self.scale, cos / self.scale, self.shift[1]]],
            dtype=torch.float32,
        )
        grid = F.affine_grid(theta[None], list(both.shape), align_corners=False)
        warped = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        return warped[:3], warped[3:]


@dataclass
class SampleTransform:
    """Record -> dict of tensors for one sample (see `collate` for the batch layout)."""

    buckets: list[tuple[int, int]]
    clip_size: int
    clip_mean: list[float]
    clip_std: list[float]
    reference_size: int
    max_subjects: int = 4
    min_instance_fraction: float = 0.01
    random_crop: bool = True
    random_flip: bool = False
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.7, 1.2)
    shift_fraction: float = 0.1
    caption_dropout: float = 0.0

    def bucket_of(self, height: int, width: int) -> int:
        return nearest_bucket(self.buckets, height, width)

    def __call__(self, record: Record, rng: np.random.Generator) -> dict:
        chosen = self._choose_subjects(record, rng)
        references = record.references or [(record.image, mask) for mask in record.masks]
        subjects = [self._augmented_subject(*references[i], rng, record.key) for i in chosen]
        bucket = self.buckets[self.bucket_of(record.image.height, record.image.width)]
        pixels, masks, time_ids = self._target(record.image, [record.masks[i] for i in chosen], bucket, rng)
        clip = [s.clip_pixels(self.clip_size, self.clip_mean, self.clip_std) for s in subjects]
        reference, reference_mask = zip(*(s.reference_pixels(self.reference_size) for s in subjects))
        return {
            "pixel_values": pixels,
            "time_ids": time_ids,
            "target_masks": masks,
            "clip_pixels": torch.stack(clip),
            "reference_pixels": torch.stack(reference),
            "reference_masks": torch.stack(reference_mask),
            "caption": "" if rng.random() < self.caption_dropout else record.caption,
            "key": record.key,
            "subject_groups": _subject_groups(record, chosen),
        }

    def _choose_subjects(self, record: Record, rng: np.random.Generator) -> list[int]:
        """Indices of up to `max_subjects` usable instances (not tiny, not the whole image)."""
        usable = [i for i, m in enumerate(record.masks) if self.min_instance_fraction <= m.mean() < 1.0]
        if not usable:
            raise SampleError(f"sample {record.key!r} has no usable subject mask (all empty, tiny or full-image)")
        if len(usable) > self.max_subjects:
            usable = sorted(rng.choice(usable, self.max_subjects, replace=False).tolist())
        return usable

    def _augmented_subject(self, image, mask, rng: np.random.Generator, key: str) -> AugmentedSubject:
        angle = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
        scale = math.exp(rng.uniform(*np.log(self.scale_range)))
        shift = tuple(rng.uniform(-self.shift_fraction, self.shift_fraction, size=2) * 2)  # grid spans [-1, 1]
        try:
            return AugmentedSubject(image, mask, angle, scale, shift)
        except SubjectError as error:
            raise SampleError(f"sample {key!r}: {error}") from None

    def _target(self, image: Image.Image, masks: list[np.ndarray], bucket: tuple[int, int], rng):
        """Resize to cover the bucket, crop, maybe flip; returns pixels in [-1, 1] (3, H, W),
        soft masks (N, H, W) and time_ids (original h, w, crop top, left, target h, w)."""
        height, width = bucket
        scale = max(height / image.height, width / image.width)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        top = int(rng.integers(0, resized[1] - height + 1)) if self.random_crop else (resized[1] - height) // 2
        left = int(rng.integers(0, resized[0] - width + 1)) if self.random_crop else (resized[0] - width) // 2
        box = (left, top, left + width, top + height)
        picture = image.resize(resized, Image.Resampling.BICUBIC).crop(box)
        mask_images = [Image.fromarray(m.astype(np.uint8) * 255).resize(resized, Image.Resampling.BILINEAR).crop(box) for m in masks]
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        soft = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in mask_images]))
        if self.random_flip and rng.random() < 0.5:
            pixels, soft = pixels.flip(-1), soft.flip(-1)
        time_ids = torch.tensor([image.height, image.width, top, left, height, width], dtype=torch.float32)
        return pixels, soft, time_ids


def collate(samples: list[dict | SampleError]) -> dict | None:
    """Stack samples of one bucket; pad subjects to the batch's largest count.

    Failed samples (`SampleError`) are dropped and reported in `skipped`; a batch where
    every sample failed becomes {"skipped": [...]} with no tensors.
    """
    good = [s for s in samples if not isinstance(s, SampleError)]
    skipped = [str(s) for s in samples if isinstance(s, SampleError)]
    if not good:
        return {"skipped": skipped}
    counts = [s["clip_pixels"].shape[0] for s in good]
    most = max(counts)
    batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in good]),
        "time_ids": torch.stack([s["time_ids"] for s in good]),
        "captions": [s["caption"] for s in good],
        "keys": [s["key"] for s in good],
        "subject_valid": torch.tensor([[i < n for i in range(most)] for n in counts]),
        "skipped": skipped,
    }
    for name in ("target_masks", "clip_pixels", "reference_pixels", "reference_masks"):
        batch[name] = torch.stack([_pad(s[name], most) for s in good])
    batch["subject_groups"] = torch.stack([_pad(s["subject_groups"], most) - (~valid).long()
                                           for s, valid in zip(good, batch["subject_valid"])])
    return batch


def _subject_groups(record: Record, chosen: list[int]) -> torch.Tensor:
    """Group labels of the chosen subjects: the record's, else every subject on its own.
    Labels are >= 0; collate marks padding with -1 (interchangeable with nothing)."""
    groups = record.subject_groups if record.subject_groups is not None else range(len(record.masks))
    labels = list(groups)
    return torch.tensor([labels[i] for i in chosen], dtype=torch.long)


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 0 to `length`."""
    return torch.cat([tensor, tensor.new_zeros(length - tensor.shape[0], *tensor.shape[1:])])
