"""The AnyStory web UI (Gradio): subjects in, a personalized image and its routing map out.

`Studio` does what the buttons do, without Gradio, so it is testable on its own;
`build_app` lays the interface out around it: up to `MAX_SLOTS` subject slots that can
be added and removed (each an image and an optional mask), the prompt, the advanced
settings (steps, CFG, eta, gamma, seed, router, size), the result beside its routing
overlay, a storyboard tab and examples. `serve` binds to localhost by default, bounds
upload size and queues requests (one generation at a time), since one model serves all.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw

from .visualize import PALETTE, routing_overlay
from .matting import MattingError, matted_subject
from .storyboard import Storyboard, run_storyboard
from .subject import Subject

MAX_SLOTS = 6
START_SLOTS = 2
THEME = gr.themes.Soft(
    primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
PROGRESS = gr.Progress(track_tqdm=True)  # Gradio finds it as a default argument: the pipeline's bars show in the page
CSS = """
.tiny-banner {background: #fff4e5; border: 1px solid #f0b060; border-radius: 8px; padding: 6px 12px;}
.slot {border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 6px;}
.pixelated img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;}
.legend span.swatch {display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin: 0 4px -1px 10px;}
"""


@dataclass
class Settings:
    """The advanced options of one generation."""

    steps: int = 25
    guidance: float = 7.5
    subject_scale: float = 1.0  # eta
    reference_shift: float = 0.0  # gamma
    seed: int = 0
    use_router: bool = True
    unconditional_references: bool = True  # CFG's unconditional branch keeps the references
    height: int = 1024
    width: int = 1024
    negative_prompt: str = ""

    def pipeline_kwargs(self) -> dict:
        return {
            "num_inference_steps": int(self.steps), "guidance_scale": float(self.guidance),
            "subject_scale": float(self.subject_scale), "reference_shift": float(self.reference_shift),
            "unconditional_references": bool(self.unconditional_references),
            "height": int(self.height), "width": int(self.width), "negative_prompt": self.negative_prompt or None,
        }


class Studio:
    """What the UI's buttons do, on one pipeline."""

    def __init__(self, pipe, label: str, tiny: bool = False):
        self.pipe, self.label, self.tiny = pipe, label, tiny
        native = pipe.default_sample_size * pipe.vae_scale_factor
        self.default_size = max(native, 64) if tiny else native  # tiny's native 32 px is too small to see
        self.workdir = Path(tempfile.mkdtemp(prefix="anystory-ui-"))
        atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)
        self.examples = example_subjects(self.workdir / "examples")

    def settings(self) -> Settings:
        """Defaults: the paper's sampling, the model's size, the router when it was trained."""
        size = self.default_size
        config = self.pipe.adapter.config
        return Settings(use_router=bool(config.router_trained), reference_shift=float(config.reference_shift),
                        unconditional_references=bool(config.unconditional_references), height=size, width=size)

    def generate(
        self, prompt: str, images: list, masks: list, settings: Settings
    ) -> tuple[Image.Image, Image.Image | None, str]:
        """The image, its routing overlay (None when the router is off) and a status line."""
        if not prompt or not prompt.strip():
            raise ValueError("write a prompt first")
        subjects, notes = [], []
        for i, (image, mask) in enumerate(zip(images, masks)):
            if image is not None:
                subject, note = slot_subject(image, mask, f"subject {i + 1}")
                subjects.append(subject)
                notes += [note] if note else []
        result = self.pipe(
            prompt, subjects=subjects, generator=torch.Generator().manual_seed(int(settings.seed)),
            use_router=settings.use_router, return_routing_maps=settings.use_router, **settings.pipeline_kwargs(),
        )
        image = result.images[0]
        overlay = None
        if result.routing_maps is not None and result.routing_maps.refined:
            overlay = routing_overlay(image, result.routing_maps.mean()[-1, 0])
        return image, overlay, status_line(len(subjects), overlay is not None, notes)

    def storyboard(self, script: str, files: list | None, settings: Settings) -> tuple[Image.Image, list, str]:
        """Run a script (its images: the uploaded files or the examples); the contact sheet,
        the frames with captions and a status line."""
        if not script or not script.strip():
            raise ValueError("paste a storyboard script first")
        story = Path(tempfile.mkdtemp(prefix="story-", dir=self.workdir))
        for path in [*self.examples, *(Path(f) for f in files or [])]:
            shutil.copy(path, story / Path(path).name)
        name = "script.json" if script.lstrip().startswith("{") else "script.yaml"
        (story / name).write_text(script, encoding="utf-8")
        board = Storyboard.load(story / name)
        kwargs = settings.pipeline_kwargs()
        kwargs.update(use_router=settings.use_router)
        result = run_storyboard(self.pipe, board, story / "out", **kwargs)
        frames = [(result.frames[f.index], f"{f.index}. {f.prompt}") for f in board.frames]
        return result.contact_sheet, frames, f"{len(frames)} frames, {len(result.characters)} characters (each encoded once)"


def slot_subject(image: Image.Image, mask: Image.Image | None, name: str) -> tuple[Subject, str | None]:
    """A slot's subject: its mask, else the alpha channel or the matting backend, else the
    whole image (with a note saying so, rather than refusing to run)."""
    if mask is not None:
        return Subject(image, mask, name=name), None
    try:
        return matted_subject(image, name=name), None
    except MattingError:
        return Subject(image.convert("RGB"), name=name), f"{name}: no mask and no matting backend, so the whole image is the subject"


def status_line(count: int, routed: bool, notes: list[str]) -> str:
    """Markdown under the result: the colour legend of the overlay and any notes."""
    if count == 0:
        text = "No subject: plain SDXL generation."
    elif routed:
        swatches = "".join(
            f"<span class='swatch' style='background: rgb{tuple(int(v) for v in PALETTE[i % len(PALETTE)])}'></span>subject {i + 1}"
            for i in range(count)
        )
        text = f"<div class='legend'>Routing overlay:{swatches} (background left as is)</div>"
    else:
        text = f"{count} subject(s); router off, so there is no routing map (subjects act everywhere)."
    return "\n\n".join([text, *notes])


def example_subjects(folder: Path) -> list[Path]:
    """Four mini-world-like references as RGBA cut-outs (alpha = mask): a coloured shape
    with a fine pattern, the kind of identity detail the method must keep."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [("red_star", (220, 50, 50)), ("blue_circle", (50, 90, 220)), ("green_triangle", (50, 170, 80)), ("yellow_square", (230, 200, 40))]
    paths = []
    for k, (name, colour) in enumerate(shapes):
        path = folder / f"{name}.png"
        _draw_shape(name.split("_")[1], colour, seed=k).save(path)
        paths.append(path)
    return paths


def _draw_shape(kind: str, colour: tuple[int, int, int], seed: int, size: int = 128) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    m = size // 8
    if kind == "circle":
        draw.ellipse((m, m, size - m, size - m), fill=255)
    elif kind == "square":
        draw.rectangle((m, m, size - m, size - m), fill=255)
    elif kind == "triangle":
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=255)
    else:
        points = [
            (size / 2 + r * np.sin(a), size / 2 - r * np.cos(a))
            for i, a in enumerate(np.linspace(0, 2 * np.pi, 10, endpoint=False))
            for r in [(size / 2 - m) if i % 2 == 0 else (size / 4 - m / 2)]
        ]
        draw.polygon(points, fill=255)
    pixels = np.zeros((size, size, 4), dtype=np.uint8)
    pixels[..., :3] = colour
    cells = np.random.default_rng(seed).random((8, 8)) > 0.5  # the identity's pattern
    pattern = np.kron(cells, np.ones((size // 8, size // 8), dtype=bool))
    pixels[pattern, :3] = (np.array(colour) * 0.55).astype(np.uint8)
    pixels[..., 3] = np.asarray(mask)
    return Image.fromarray(pixels, "RGBA")


EXAMPLE_PROMPTS = (
    "on the left, a red star; on the right, a blue circle",
    "a green triangle on a beach",
    "on the left, a yellow square; on the right, a red star",
)
SAMPLE_SCRIPT = """\
title: Two friends
style: "{}, flat illustration"
characters:
  - alias: Star
    image: red_star.png        # files: uploaded below, or the examples
    description: a red star
  - alias: Moon
    image: blue_circle.png
    description: a blue circle
frames:
  - prompt: Star on a beach
  - prompt: on the left, Star; on the right, Moon
  - prompt: Moon in the snow
"""


def build_app(studio: Studio) -> gr.Blocks:
    """The interface around a `Studio`."""
    with gr.Blocks(title="AnyStory") as app:
        gr.Markdown("# AnyStory\nPersonalized generation with one or many subjects: each keeps its identity, none blends into another.")
        gr.Markdown(f"**Model:** {studio.label}", elem_classes=["tiny-banner"] if studio.tiny else None, elem_id="model-label")
        with gr.Tab("Generate"):
            settings = _generate_tab(studio)
        with gr.Tab("Storyboard"):
            _storyboard_tab(studio, settings)
    return app


def _generate_tab(studio: Studio) -> list:
    """Prompt, subject slots, advanced options, result and overlay, examples; returns the
    advanced options (the storyboard tab uses them too)."""
    small = ["pixelated"] if studio.default_size < 256 else None  # small models: show pixels, not blur
    with gr.Row():
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder=EXAMPLE_PROMPTS[0])
            slots, images, masks, removers = _subject_slots()
            gr.Markdown("Without a mask, a subject's alpha channel is used, else the matting backend, else the whole image.")
            add = gr.Button("+ Add subject", size="sm", elem_id="add-subject")
            settings = _advanced_settings(studio.settings(), studio.default_size)
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=4):
            with gr.Row():
                result = gr.Image(label="Result", type="pil", format="png", elem_id="result", interactive=False,
                                  height=320, elem_classes=small)
                overlay = gr.Image(label="Routing map", type="pil", format="png", elem_id="routing",
                                   interactive=False, height=320, elem_classes=small)
            status = gr.Markdown(elem_id="status")
    paths = [str(p) for p in studio.examples]
    gr.Examples(
        examples=[[EXAMPLE_PROMPTS[0], paths[0], paths[1]], [EXAMPLE_PROMPTS[1], paths[2], None],
                  [EXAMPLE_PROMPTS[2], paths[3], paths[0]]],
        inputs=[prompt, images[0], images[1]], label="Examples",
    )
    visible = gr.State([i < START_SLOTS for i in range(MAX_SLOTS)])
    add.click(_add_slot, visible, [visible, *slots])
    for i, remove in enumerate(removers):
        remove.click(lambda v, i=i: _remove_slot(v, i), visible, [visible, *slots, images[i], masks[i]])

    def on_generate(text, *values, progress=PROGRESS):
        images, masks, options = values[:MAX_SLOTS], values[MAX_SLOTS : 2 * MAX_SLOTS], values[2 * MAX_SLOTS :]
        return _as_ui_error(studio.generate, text, list(images), list(masks), Settings(*options))

    run.click(on_generate, [prompt, *images, *masks, *settings], [result, overlay, status], concurrency_id="model")
    return settings


def _storyboard_tab(studio: Studio, settings: list) -> None:
    with gr.Row():
        with gr.Column(scale=5):
            script = gr.Code(SAMPLE_SCRIPT, language="yaml", label="Script (YAML or JSON, official AnyStory scripts too)", lines=16)
            files = gr.File(label="Reference images the script names", file_count="multiple", file_types=["image"])
            gr.Markdown("Uses the advanced options of the Generate tab. Characters without an image are generated from their prompt first.")
            tell = gr.Button("Tell the story", variant="primary", elem_id="storyboard-run")
        with gr.Column(scale=5):
            sheet = gr.Image(label="Contact sheet", type="pil", format="png", interactive=False)
            frames = gr.Gallery(label="Frames", columns=3, format="png")
            status = gr.Markdown()

    def on_storyboard(text, uploads, *options, progress=PROGRESS):
        return _as_ui_error(studio.storyboard, text, uploads, Settings(*options))

    tell.click(on_storyboard, [script, files, *settings], [sheet, frames, status], concurrency_id="model")


def _subject_slots():
    slots, images, masks, removers = [], [], [], []
    with gr.Row():
        for i in range(MAX_SLOTS):
            with gr.Column(visible=i < START_SLOTS, min_width=180, elem_classes=["slot"], elem_id=f"slot-{i}") as slot:
                images.append(gr.Image(label=f"Subject {i + 1}", type="pil", image_mode="RGBA", height=170,
                                       sources=["upload", "clipboard"], elem_id=f"subject-{i}"))
                masks.append(gr.Image(label="Mask (optional)", type="pil", image_mode="L",
                                      height=150, sources=["upload", "clipboard"], elem_id=f"mask-{i}"))
                removers.append(gr.Button("Remove", size="sm", elem_id=f"remove-{i}"))
            slots.append(slot)
    return slots, images, masks, removers


def _advanced_settings(defaults: Settings, size: int) -> list:
    """Inputs in the order of `Settings`' fields."""
    with gr.Accordion("Advanced options", open=False):
        with gr.Row():
            steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps")
            guidance = gr.Slider(1.0, 15.0, value=defaults.guidance, step=0.5, label="CFG scale")
        with gr.Row():
            eta = gr.Slider(0.0, 2.0, value=defaults.subject_scale, step=0.05, label="Subject strength η")
            gamma = gr.Slider(-5.0, 5.0, value=defaults.reference_shift, step=0.1, label="Reference shift γ")
        with gr.Row():
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
            router = gr.Checkbox(value=defaults.use_router, label="Router (route each subject to its region)")
            unconditional = gr.Checkbox(value=defaults.unconditional_references,
                                        label="Keep references in CFG's unconditional branch (off: guidance amplifies them)")
        with gr.Row():
            low, high = max(8, size // 2 // 8 * 8), size * 2
            height = gr.Slider(low, high, value=defaults.height, step=8, label="Height")
            width = gr.Slider(low, high, value=defaults.width, step=8, label="Width")
        negative = gr.Textbox(label="Negative prompt", value="")
    return [steps, guidance, eta, gamma, seed, router, unconditional, height, width, negative]


def _add_slot(visible: list[bool]):
    if all(visible):
        gr.Info(f"at most {MAX_SLOTS} subjects")
        return visible, *(gr.update() for _ in visible)
    visible = list(visible)
    visible[visible.index(False)] = True
    return visible, *(gr.update(visible=v) for v in visible)


def _remove_slot(visible: list[bool], index: int):
    visible = list(visible)
    visible[index] = False
    return visible, *(gr.update(visible=v) for v in visible), None, None


def _as_ui_error(action, *args):
    """Bad inputs become a message in the page, not a stack trace."""
    try:
        return action(*args)
    except (ValueError, OSError) as error:
        raise gr.Error(str(error)) from None


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, max_file_size: str | int = "10mb",
           queue_size: int = 16, block: bool = True):
    """Queue requests (one model: one generation at a time) and start the server."""
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    return app.launch(
        server_name=host, server_port=port, max_file_size=max_file_size, prevent_thread_lock=not block,
        show_error=True, ssr_mode=False, theme=THEME, css=CSS, quiet=not block,
    )


def serve(pipe, label: str, host: str = "127.0.0.1", port: int = 7860, max_file_size: str | int = "10mb",
          queue_size: int = 16, tiny: bool = False) -> None:
    """Build the UI on `pipe` and serve it until interrupted."""
    studio = Studio(pipe, label, tiny=tiny)
    launch(build_app(studio), host, port, max_file_size, queue_size)
