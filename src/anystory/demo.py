"""The main job: AnyStory end to end on the bundled mini-world weights, no download.

A single-subject image, a two-subject image and a three-frame storyboard with two
recurring characters, from bundled references; PNGs, routing-map overlays and an index
page that shows them side by side.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import torch

from . import Subject
from .mini import load_pipeline
from .storyboard import Storyboard, run_storyboard
from .visualize import routing_overlay

ASSETS = Path(__file__).parent / "mini" / "assets"
SHOTS = [
    ("single", "in the middle, a red heart; beach background", ("hero",)),
    ("pair", "on the left, a red heart; on the right, a blue circle; forest background", ("hero", "friend")),
]
VIEW = 256  # pixels on the index page (the mini world renders at 64)


def _figure(path: str, caption: str) -> str:
    return (f"<figure><img src='{path}' width={VIEW} style='image-rendering:pixelated'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def run_demo(out: Path, seed: int = 0) -> Path:
    """Write the demo into `out` and return its index page."""
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sections = []
    for name, prompt, cast in SHOTS:
        subjects = [Subject(ASSETS / f"{who}.png", name=who) for who in cast]
        result = pipe(prompt, subjects=subjects, generator=torch.Generator().manual_seed(seed), return_routing_maps=True)
        result.images[0].save(out / f"{name}.png")
        routing_overlay(result.images[0], result.routing_maps.mean()[-1, 0]).save(out / f"{name}_routing.png")
        for who in cast:
            shutil.copy(ASSETS / f"{who}.png", out / f"reference_{who}.png")
        figures = [_figure(f"reference_{w}.png", f"reference: {w}") for w in cast]
        figures += [_figure(f"{name}.png", prompt), _figure(f"{name}_routing.png", "routing map (last step)")]
        sections.append(f"<h2>{name}</h2><div style='display:flex;gap:12px'>{''.join(figures)}</div>")
    story = run_storyboard(pipe, Storyboard.load(ASSETS / "story.yaml"), out / "storyboard", progress=False)
    sections.append(f"<h2>storyboard</h2>{_figure('storyboard/contact_sheet.png', f'{len(story.frames)} frames, each character encoded once')}")
    index = out / "index.html"
    index.write_text(
        "<html><head><meta charset='utf-8'><title>AnyStory demo</title></head><body>"
        "<h1>AnyStory demo (mini world, bundled weights)</h1>" + "".join(sections) + "</body></html>"
    )
    return index
