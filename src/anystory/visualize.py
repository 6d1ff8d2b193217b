"""Routing maps over denoising steps and layers, drawn like the paper's Fig. 5.

The router's claim is that it finds each subject's region early in denoising and at
every depth of the U-Net, and that the refinement sharpens the coarse map. One picture
shows all three: rows are denoising steps, columns are groups of layers (the U-Net's
down / mid / up stages, or every layer) plus the all-layer mean, the refined maps on the
left and the coarse maps on the right. A cell colours each position by its soft routing
weights (subject i in `PALETTE[i]`, the background dark), so blending shows as mixed
colour and a clean route as a pure one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .models import transformer_blocks
from .pipelines import RoutingMaps

PALETTE = np.array([[230, 60, 60], [60, 110, 230], [60, 190, 90], [230, 200, 60]], dtype=np.float32)
BACKGROUND = np.array([40, 40, 40], dtype=np.float32)
PAD = 4
LABEL_WIDTH = 72
HEADER_HEIGHT = 40
LEGEND_HEIGHT = 28
KINDS = ("refined", "coarse")

LayerGroups = list[tuple[str, list[int]]]


def routing_overlay(image: Image.Image, maps: torch.Tensor) -> Image.Image:
    """Colour each pixel by the subject its route points to (background left as is).

    maps: (N+1, h, w) routing weights of one image, entry N the background."""
    owner = maps.argmax(dim=0)
    owner = np.asarray(Image.fromarray(owner.numpy().astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    for i in range(maps.shape[0] - 1):
        pixels[owner == i] = 0.5 * pixels[owner == i] + 0.5 * PALETTE[i % len(PALETTE)]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def layer_groups(unet: torch.nn.Module) -> LayerGroups:
    """The transformer blocks of each U-Net stage ("down.1", "mid", "up.0", ...), as indices
    into the routing maps (which list layers in forward order)."""
    index = {id(block): i for i, block in enumerate(transformer_blocks(unet))}
    stages = [(f"down.{i}", b) for i, b in enumerate(unet.down_blocks)]
    stages += [("mid", unet.mid_block)] + [(f"up.{i}", b) for i, b in enumerate(unet.up_blocks)]
    groups = []
    for name, stage in stages:
        layers = [index[id(m)] for m in (stage.modules() if stage is not None else ()) if id(m) in index]
        if layers:
            groups.append((name, layers))
    return groups


def pick_steps(total: int, rows: int) -> list[int]:
    """Up to `rows` step indices spread evenly over `total` steps, first and last included."""
    if total < 1 or rows < 1:
        raise ValueError(f"need at least one step and one row, got {total} steps and {rows} rows")
    return sorted({round(s) for s in np.linspace(0, total - 1, min(rows, total))})


def colorize(maps: torch.Tensor, size: int) -> Image.Image:
    """Soft maps (N+1, h, w), entry N the background, as a `size` x `size` RGB tile."""
    count = maps.shape[0] - 1
    colours = np.concatenate([PALETTE[np.arange(count) % len(PALETTE)], BACKGROUND[None]])
    rgb = np.einsum("nhw,nc->hwc", maps.float().numpy(), colours)
    tile = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    return tile.resize((size, size), Image.Resampling.NEAREST)


def grid_shape(rows: int, columns: int, cell: int) -> tuple[int, int]:
    """(width, height) of a grid with `rows` steps and `columns` columns per kind."""
    panel = columns * (cell + PAD)
    width = LABEL_WIDTH + len(KINDS) * panel + (len(KINDS) - 1) * 2 * PAD + PAD
    height = HEADER_HEIGHT + rows * (cell + PAD) + LEGEND_HEIGHT
    return width, height


def routing_grid(
    maps: RoutingMaps,
    groups: LayerGroups | None = None,
    rows: int = 5,
    cell: int = 96,
    batch_index: int = 0,
    names: Sequence[str] = (),
) -> Image.Image:
    """The Fig. 5 picture of one image's routing maps.

    groups: columns as (label, layer indices); None gives one column per layer. The last
    column of each kind is the mean over all layers. names: subject names for the legend.
    """
    layers = len(maps.refined)
    groups = groups or [(f"L{i}", [i]) for i in range(layers)]
    if any(not 0 <= i < layers for _, members in groups for i in members):
        raise ValueError(f"layer groups name layers outside the {layers} recorded")
    columns = [*groups, ("all", list(range(layers)))]
    steps = pick_steps(maps.refined[0].shape[0], rows)
    sheet = Image.new("RGB", grid_shape(len(steps), len(columns), cell), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    panel = len(columns) * (cell + PAD) + 2 * PAD
    for k, kind in enumerate(KINDS):
        x0 = LABEL_WIDTH + k * panel
        draw.text((x0, 4), f"{kind} maps", fill="black", font=font)
        for c, (label, members) in enumerate(columns):
            h, w = max((maps.refined[i].shape[-2:] for i in members), key=lambda s: s[0] * s[1])
            draw.text((x0 + c * (cell + PAD), 22), f"{label} {h}x{w}", fill="black", font=font)
        for r, step in enumerate(steps):
            for c, (_, members) in enumerate(columns):
                tile = colorize(_group_mean(maps, kind, members, step, batch_index), cell)
                sheet.paste(tile, (x0 + c * (cell + PAD), HEADER_HEIGHT + r * (cell + PAD)))
    for r, step in enumerate(steps):
        draw.text((4, HEADER_HEIGHT + r * (cell + PAD) + cell // 2 - 6), f"step {step + 1}", fill="black", font=font)
    _legend(draw, font, sheet.height - LEGEND_HEIGHT + 6, maps.refined[0].shape[2] - 1, names)
    return sheet


def _group_mean(maps: RoutingMaps, kind: str, layers: list[int], step: int, batch_index: int) -> torch.Tensor:
    """The mean of the group's maps at one step, at the group's finest resolution."""
    chosen = RoutingMaps(**{kind: [getattr(maps, kind)[i][step : step + 1, batch_index : batch_index + 1] for i in layers]})
    return chosen.mean(kind)[0, 0]


def _legend(draw: ImageDraw.ImageDraw, font, y: int, count: int, names: Sequence[str]) -> None:
    labels = [names[i] if i < len(names) and names[i] else f"subject {i + 1}" for i in range(count)] + ["background"]
    colours = [tuple(int(v) for v in PALETTE[i % len(PALETTE)]) for i in range(count)] + [tuple(int(v) for v in BACKGROUND)]
    x = LABEL_WIDTH
    for label, colour in zip(labels, colours):
        draw.rectangle((x, y, x + 12, y + 12), fill=colour)
        draw.text((x + 16, y), label, fill="black", font=font)
        x += 24 + int(draw.textlength(label, font=font))
