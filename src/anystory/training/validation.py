"""Periodic validation images: references | generated image | routing overlay (stage 2).

Images come from `AnyStorySDXLPipeline` itself, so they show what a user would get at
that step. The training RNG is forked around them: validating never changes training.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..pipelines import AnyStorySDXLPipeline
from ..subject import Subject, SubjectError
from ..visualize import routing_overlay
from .data import Record, SampleError
from .transforms import SampleTransform

@dataclass
class ValidationSample:
    prompt: str
    subjects: list[Subject]


@dataclass
class ValidationSet:
    samples: list[ValidationSample]
    stage: int

    @classmethod
    def from_source(cls, source, stage: int, transform: SampleTransform, count: int) -> "ValidationSet":
        """The first `count` usable records of the training source, with their subjects
        (stage 2: the instances cut from the image, as the references of training)."""
        samples = []
        for record in itertools.islice(_records(source), count * 4):
            try:
                references = record.references or [(record.image, m) for m in record.masks]
                subjects = [Subject(image, mask) for image, mask in references[: transform.max_subjects]]
            except SubjectError:
                continue
            samples.append(ValidationSample(record.caption, subjects))
            if len(samples) == count:
                break
        return cls(samples, stage)

    def render(
        self, pipeline: AnyStorySDXLPipeline, folder: Path, step: int, resolution: int,
        num_inference_steps: int, guidance_scale: float,
    ) -> tuple[Path, Image.Image] | None:
        """Render every sample into one grid PNG `folder/step-<step>.png`; None if no sample."""
        if not self.samples:
            return None
        rows = []
        with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="use_router=True")  # the router is being trained
            for sample in self.samples:
                out = pipeline(
                    sample.prompt, subjects=sample.subjects, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, height=resolution, width=resolution,
                    generator=torch.Generator().manual_seed(0), use_router=self.stage == 2,
                    return_routing_maps=self.stage == 2,
                )
                image = out.images[0]
                panels = [s.image.resize(image.size) for s in sample.subjects] + [image]
                if out.routing_maps is not None:
                    panels.append(routing_overlay(image, out.routing_maps.mean()[-1, 0]))
                rows.append(panels)
        grid = _grid(rows)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:08d}.png"
        grid.save(path)
        return path, grid


def _records(source):
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        for index in range(len(source)):
            try:
                yield source[index]
            except SampleError:
                continue
    else:
        yield from (r for r in source if isinstance(r, Record))


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    width = max(sum(p.width for p in row) for row in rows)
    height = sum(max(p.height for p in row) for row in rows)
    grid = Image.new("RGB", (width, height))
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            grid.paste(panel.convert("RGB"), (x, y))
            x += panel.width
        y += max(p.height for p in row)
    return grid
