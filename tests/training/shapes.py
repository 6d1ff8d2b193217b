"""A small synthetic world for the training tests: coloured shapes on plain backgrounds,
with instance masks and captions in the tiny tokenizer's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from anystory.training import Record

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 190, 60), "yellow": (230, 210, 40)}
SHAPES = ("star", "mug")  # drawn as a diamond and a square
SIZE = 32


def _shape_mask(shape: str, cy: int, cx: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if shape == "star":
        return (np.abs(yy - cy) + np.abs(xx - cx)) <= radius
    return (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)


def _render(objects: list[tuple[str, str, int, int, int]], background: int) -> tuple[Image.Image, list[np.ndarray]]:
    pixels = np.full((SIZE, SIZE, 3), background, dtype=np.uint8)
    masks = []
    for colour, shape, cy, cx, radius in objects:
        mask = _shape_mask(shape, cy, cx, radius)
        pixels[mask] = COLOURS[colour]
        masks.append(mask)
    return Image.fromarray(pixels), masks


def pair_records(count: int, seed: int = 0) -> list[Record]:
    """Stage-1 pairs: one subject drawn in two contexts (position, size, background)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        contexts = []
        for _ in range(2):
            radius = int(rng.integers(5, 9))
            cy, cx = rng.integers(radius, SIZE - radius, size=2)
            image, (mask,) = _render([(colour, shape, int(cy), int(cx), radius)], int(rng.integers(60, 200)))
            contexts.append((image, mask))
        (reference, reference_mask), (target, target_mask) = contexts
        records.append(Record(target, f"a {colour} {shape}", [target_mask], [(reference, reference_mask)], key=f"pair{i}"))
    return records


def scene_records(count: int, seed: int = 0) -> list[Record]:
    """Stage-2 scenes: two subjects of different colours, left and right."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        colours = rng.choice(list(COLOURS), size=2, replace=False)
        objects = []
        for colour, cx in zip(colours, (8, 24)):
            radius = int(rng.integers(5, 8))
            cy = int(rng.integers(radius, SIZE - radius))
            objects.append((str(colour), str(rng.choice(SHAPES)), cy, cx + int(rng.integers(-2, 3)), radius))
        image, masks = _render(objects, int(rng.integers(60, 200)))
        caption = f"on the left a {objects[0][0]} {objects[0][1]} and on the right a {objects[1][0]} {objects[1][1]}"
        records.append(Record(image, caption, masks, key=f"scene{i}"))
    return records


def _save(image: Image.Image | np.ndarray, path: Path) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) * 255)
    image.save(path)
    return path.name


def write_pair_manifest(folder: Path, records: list[Record]) -> Path:
    """Stage-1 JSONL manifest with its images next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        (reference, reference_mask), = r.references
        lines.append(json.dumps({
            "reference_image": _save(reference, folder / f"{r.key}_ref.png"),
            "reference_mask": _save(reference_mask, folder / f"{r.key}_ref_mask.png"),
            "target_image": _save(r.image, folder / f"{r.key}.png"),
            "target_mask": _save(r.masks[0], folder / f"{r.key}_mask.png"),
            "caption": r.caption,
        }))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_scene_manifest(folder: Path, records: list[Record]) -> Path:
    """Stage-2 JSONL manifest with its images next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        instances = [{"mask": _save(m, folder / f"{r.key}_mask{j}.png")} for j, m in enumerate(r.masks)]
        lines.append(json.dumps({"image": _save(r.image, folder / f"{r.key}.png"), "caption": r.caption, "instances": instances}))
    manifest = folder / "scenes.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
