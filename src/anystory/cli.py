"""The `anystory` command line: generate, storyboard, visualize, segment, evaluate, serve,
train, demo and mini (the mini world: `anystory mini evaluate`).

Every command that needs a model takes the same options: `--model mini` (the bundled
mini-world weights, the default), `--model tiny` (tiny random weights: every stage of the
method runs, the pictures are noise; for trying the tool), or `--model PATH` (an SDXL
diffusers folder or single-file checkpoint) with `--adapter` and `--image-encoder`.
Bad inputs end with one `anystory: error: ...` line and exit code 2 (set
ANYSTORY_DEBUG=1 to see the traceback). Heavy libraries load only when a command runs,
so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from . import AnyStorySDXLPipeline, Subject

MODEL_HELP = (
    "'mini' (bundled mini-world weights, default), 'tiny' (random test weights: noise), or PATH: "
    "an SDXL diffusers folder or single-file .safetensors checkpoint"
)
TINY_LABEL = "tiny RANDOM weights (for trying the tool: the pictures are noise)"
DTYPES = ("auto", "float32", "float16", "bfloat16")


class CliError(Exception):
    """A problem with what was asked on the command line, said in one line."""


# -- loading the model -------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    """`auto` picks CUDA, then Apple MPS, then the CPU."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is float16 on accelerators and float32 on the CPU (as diffusers users expect)."""
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, dtype)


def tiny_pipeline(seed: int = 0) -> AnyStorySDXLPipeline:
    """A tiny SDXL-shaped pipeline with random weights and a router marked as trained, so
    every stage runs (routing maps included) in a fraction of a second."""
    import torch

    from . import AnyStoryAdapter, AnyStorySDXLPipeline
    from .testing import tiny_sdxl_components

    components = tiny_sdxl_components(seed)
    torch.manual_seed(seed)
    adapter = AnyStoryAdapter.from_unet(
        components["unet"], image_embed_dim=24, num_subject_tokens=4, qformer_dim=32, qformer_heads=4,
        routing_dim=32, router_dim=16, router_heads=2, reference_size=32, router_trained=True,
    )
    return AnyStorySDXLPipeline(**components, adapter=adapter)


def load_pipeline(
    model: str = "mini",
    adapter: str | None = None,
    image_encoder: str | None = None,
    base_config: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[AnyStorySDXLPipeline, str]:
    """The pipeline a command runs on, moved to `device`, and a one-line description of it."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if model == "mini":
        pipe, label = _mini_pipeline(), "mini world (bundled weights)"
    elif model == "tiny":
        pipe, label = tiny_pipeline(), TINY_LABEL
    else:
        pipe = _base_pipeline(Path(model).expanduser(), adapter, image_encoder, base_config, torch_dtype)
        label = f"SDXL {model}"
    if pipe.dtype != torch_dtype:  # a cast only when needed: diffusers warns about every `to(dtype)`
        pipe.to(dtype=torch_dtype)
    return pipe.to(device), label


def _mini_pipeline() -> AnyStorySDXLPipeline:
    from .mini import load_pipeline as load_mini

    try:
        return load_mini()
    except FileNotFoundError as error:
        raise CliError(f"{error}; or use --model PATH (a real SDXL) or --model tiny (random weights)") from None


def _base_pipeline(model: Path, adapter, image_encoder, base_config, torch_dtype) -> AnyStorySDXLPipeline:
    from . import AnyStorySDXLPipeline

    if not model.exists():
        raise CliError(f"model not found: {model} ({MODEL_HELP})")
    adapter = _beside(model, adapter, "adapter", "--adapter", "the AnyStory adapter folder")
    image_encoder = _beside(model, image_encoder, "image_encoder", "--image-encoder", "the CLIP vision encoder folder")
    extra = {}
    if model.is_file():
        if base_config is None:
            raise CliError(
                "a single-file checkpoint needs --base-config DIR: a local SDXL diffusers folder that gives "
                "its component configs (nothing is downloaded)"
            )
        extra["config"] = str(base_config)
    print(f"loading {model} ...", file=sys.stderr)
    return AnyStorySDXLPipeline.from_base(model, adapter, image_encoder, torch_dtype=torch_dtype, **extra)


def _beside(model: Path, given: str | None, folder: str, flag: str, what: str) -> Path:
    """A component folder: the one given, else MODEL/<folder> when the model folder has it."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise CliError(f"{flag} folder not found: {path}")
        return path
    if model.is_dir() and (model / folder).is_dir():
        return model / folder
    raise CliError(f"{flag} is required with --model PATH: {what} (or put it in {model / folder})")


def _pipeline(args: argparse.Namespace) -> AnyStorySDXLPipeline:
    pipe, label = load_pipeline(args.model, args.adapter, args.image_encoder, args.base_config, args.device, args.dtype)
    print(f"model: {label}", file=sys.stderr)
    return pipe


# -- subjects and common generation settings ----------------------------------------------------


def parse_subject_spec(spec: str) -> tuple[Path, Path | None]:
    """IMAGE or IMAGE:MASK. A path that exists as given is an image even if it has a colon."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), None
    image, mask = spec.rsplit(":", 1)
    return Path(image), Path(mask)


def check_images(paths: list[Path | None], what: str) -> None:
    """Fail before any model loads when an input file is missing or not an image."""
    from .subject import load_image

    for path in paths:
        if path is not None:
            load_image(path, what)


def load_subjects(specs: list[str], matting: str) -> list[Subject]:
    """Subjects from IMAGE[:MASK] specs; without a mask, the alpha channel or the matting
    backend gives one (`--matting none`: the whole image is the subject)."""
    from .matting import matted_subject
    from .subject import Subject

    subjects = []
    for spec in specs:
        image, mask = parse_subject_spec(spec)
        if matting == "none" and mask is None:
            subjects.append(Subject(image))
        else:
            subjects.append(matted_subject(image, mask, backend=None if matting == "auto" else matting))
    return subjects


def output_size(pipe: AnyStorySDXLPipeline, args: argparse.Namespace) -> tuple[int, int]:
    """(height, width): the ones asked for, else the model's native size."""
    native = pipe.default_sample_size * pipe.vae_scale_factor
    return args.height or native, args.width or native


def generation_kwargs(pipe: AnyStorySDXLPipeline, args: argparse.Namespace) -> dict:
    """Pipeline arguments shared by generate, visualize and storyboard."""
    height, width = output_size(pipe, args)
    kwargs = {
        "num_inference_steps": args.steps, "guidance_scale": args.guidance, "subject_scale": args.subject_scale,
        "reference_shift": args.reference_shift, "unconditional_references": args.unconditional_references,
        "height": height, "width": width,
    }
    if args.negative_prompt:
        kwargs["negative_prompt"] = args.negative_prompt
    return kwargs


def _generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed)


def _save(image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _numbered(path: Path, index: int, count: int, suffix: str = "") -> Path:
    """out.png -> out.png / out-2.png ..., with an optional suffix before the extension."""
    stem = path.stem + (f"-{index + 1}" if count > 1 else "") + suffix
    return path.with_name(stem + (path.suffix or ".png"))


# -- commands ---------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    index = run_demo(Path(args.out), seed=args.seed)
    print(f"demo written: {index}")


def _generate(args: argparse.Namespace) -> None:
    from .visualize import routing_overlay

    specs = [parse_subject_spec(s) for s in args.subject]
    check_images([p for spec in specs for p in spec], "subject")
    check_images([Path(p) for p in args.layout], "layout mask")
    if args.layout and len(args.layout) != len(args.subject):
        raise CliError(f"--layout takes one mask per --subject: {len(args.subject)} subjects, {len(args.layout)} masks")
    pipe = _pipeline(args)
    subjects = load_subjects(args.subject, args.matting)
    kwargs = generation_kwargs(pipe, args)
    layout = _layout(args.layout, (kwargs["height"], kwargs["width"])) if args.layout else None
    want_maps = args.routing_maps and not args.no_router and layout is None
    if args.routing_maps and not want_maps:
        print("note: no routing maps with --no-router or --layout (the router does not run)", file=sys.stderr)
    result = pipe(
        args.prompt, subjects=subjects, generator=_generator(args.seed), num_images_per_prompt=args.num_images,
        use_router=False if args.no_router else None, subject_masks=layout, return_routing_maps=want_maps, **kwargs,
    )
    out = Path(args.out)
    for i, image in enumerate(result.images):
        print(f"image: {_save(image, _numbered(out, i, len(result.images)))}")
        if want_maps and result.routing_maps is not None:
            overlay = routing_overlay(image, result.routing_maps.mean()[-1, i])
            print(f"routing overlay: {_save(overlay, _numbered(out, i, len(result.images), '_routing'))}")


def _layout(paths: list[str], size: tuple[int, int]) -> list:
    """User layout masks, resized to the output (height, width), as boolean arrays."""
    import numpy as np
    from PIL import Image

    from .subject import load_image

    height, width = size
    masks = [load_image(Path(p), "layout mask").convert("L").resize((width, height), Image.Resampling.NEAREST) for p in paths]
    return [np.asarray(m) >= 128 for m in masks]


def _storyboard(args: argparse.Namespace) -> None:
    from .storyboard import Storyboard, run_storyboard

    board = Storyboard.load(args.script)
    if args.character:
        references = {}
        for item in args.character:
            alias, sep, spec = item.partition("=")
            if not sep or not alias or not spec:
                raise CliError(f"--character takes ALIAS=IMAGE[:MASK], got {item!r}")
            references[alias] = parse_subject_spec(spec)
            check_images(list(references[alias]), f"reference of {alias}")
        board = board.with_references(references)
    pipe = _pipeline(args)
    kwargs = generation_kwargs(pipe, args)
    kwargs.update(use_router=False if args.no_router else None)
    result = run_storyboard(
        pipe, board, args.out, batch_size=args.batch_size,
        matting=None if args.matting == "auto" else args.matting, **kwargs,
    )
    print(f"{len(result.frames)} frames: {Path(args.out) / 'frames'}")
    print(f"contact sheet: {Path(args.out) / 'contact_sheet.png'}")


def _visualize(args: argparse.Namespace) -> None:
    from .visualize import layer_groups, routing_grid

    check_images([p for s in args.subject for p in parse_subject_spec(s)], "subject")
    pipe = _pipeline(args)
    subjects = load_subjects(args.subject, args.matting)
    result = pipe(
        args.prompt, subjects=subjects, generator=_generator(args.seed), use_router=True,
        return_routing_maps=True, **generation_kwargs(pipe, args),
    )
    groups = layer_groups(pipe.unet) if args.layers == "stages" else None
    grid = routing_grid(result.routing_maps, groups, rows=args.rows, cell=args.cell, names=[s.name for s in subjects])
    out = Path(args.out)
    print(f"routing grid: {_save(grid, out)}")
    print(f"image: {_save(result.images[0], out.with_name(out.stem + '_image.png'))}")


def _segment(args: argparse.Namespace) -> None:
    from PIL import Image

    from .visualize import routing_overlay
    from .segment import segment
    from .subject import load_image

    check_images([Path(args.image)], "image to segment")
    check_images([p for s in args.subject for p in parse_subject_spec(s)], "subject")
    pipe = _pipeline(args)
    subjects = load_subjects(args.subject, args.matting)
    result = segment(
        pipe, args.image, subjects, prompt=args.prompt, strength=args.strength,
        num_inference_steps=args.steps, resolution=args.resolution, generator=_generator(args.seed),
    )
    out = Path(args.out)
    for i, (subject, mask) in enumerate(zip(subjects, result.masks)):
        path = _save(Image.fromarray(mask.numpy().astype("uint8") * 255), out / f"mask_{i + 1}_{subject.name or 'subject'}.png")
        print(f"{subject.name or f'subject {i + 1}'}: {100 * mask.float().mean():.1f}% of the image -> {path}")
    picture = load_image(Path(args.image), "image to segment").convert("RGB")
    print(f"overlay: {_save(routing_overlay(picture, result.maps), out / 'overlay.png')}")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import (
        DreamBench,
        MetricModels,
        evaluate,
        format_table,
        load_groups,
    )

    bench = DreamBench.load(args.dataset)
    cases = (
        bench.multi_subject_cases(load_groups(args.groups)) if args.groups
        else bench.single_subject_cases(args.subjects or None)
    )
    if args.prompts:
        cases = [c for c in cases if c.prompt_index < args.prompts]
    metrics = MetricModels.from_pretrained(args.dino, args.clip, device=args.metrics_device)
    pipe = _pipeline(args)
    kwargs = generation_kwargs(pipe, args)

    def generate(prompt, images, seed):
        subjects = [_photo_subject(image, args.matting) for image in images]
        return pipe(prompt, subjects=subjects, generator=_generator(seed), **kwargs).images[0]

    scores = evaluate(cases, generate, metrics, method=args.method, seed=args.seed,
                      images_per_prompt=args.images_per_prompt, out_dir=args.out)
    print(format_table([scores]))
    if args.out:
        summary = {k: getattr(scores, k) for k in ("method", "dino", "clip_i", "clip_t", "samples", "per_subject")}
        path = Path(args.out) / "scores.json"
        path.write_text(json.dumps(summary, indent=2))
        print(f"scores: {path}")


def _photo_subject(image, matting: str) -> Subject:
    from .matting import matted_subject
    from .subject import Subject

    if matting == "none":
        return Subject(image)
    return matted_subject(image, backend=None if matting == "auto" else matting)


def _serve(args: argparse.Namespace) -> None:
    try:
        from .webui import serve
    except ImportError as error:
        raise CliError(f"the web UI needs gradio: pip install 'anystory[ui]' ({error})") from None
    if args.tiny:
        args.model = "tiny"
    pipe, label = load_pipeline(args.model, args.adapter, args.image_encoder, args.base_config, args.device, args.dtype)
    serve(pipe, label, host=args.host, port=args.port, max_file_size=args.max_file_size,
          queue_size=args.queue_size, tiny=args.model == "tiny")


def _mini_evaluate(args: argparse.Namespace) -> None:
    from .mini.claims import CLAIMS, run_claims

    claims = [c.strip() for c in args.claims.split(",") if c.strip()]
    unknown = sorted(set(claims) - set(CLAIMS))
    if unknown or not claims:
        raise CliError(f"--claims takes a comma-separated subset of {','.join(CLAIMS)}, got {args.claims!r}")
    if args.count < 1:
        raise CliError(f"--count must be at least 1, got {args.count}")
    given = {"seed": args.seed, "weights": args.weights and Path(args.weights)}
    run_claims(claims, count=args.count, out=Path(args.out), **{k: v for k, v in given.items() if v is not None})
    print(f"claims: {Path(args.out) / 'claims.json'}, table: {Path(args.out) / 'claims.md'}")


def _train(argv: list[str]) -> int:
    from .training.cli import main as train_main

    return train_main(argv)


# -- the parser -------------------------------------------------------------------------------

EXAMPLES = {
    "generate": """examples:
  anystory generate "a dog and a cat on the beach" --subject dog.png:dog_mask.png --subject cat_rgba.png \\
      --model ~/models/RealVisXL_V4.0 --adapter ~/models/anystory-adapter --image-encoder ~/models/clip-vit-h-14
  anystory generate "on the left a red star; on the right a blue circle" --subject star.png --subject circle.png \\
      --seed 7 --routing-maps --out outputs/stars.png       # mini world: no download
  anystory generate "..." --subject a.png --subject b.png --layout left.png right.png   # place subjects yourself

A subject is IMAGE or IMAGE:MASK. Without a mask the image's alpha channel is used, else a
matting backend (--matting), else use --matting none to take the whole image.""",
    "storyboard": """examples:
  anystory storyboard story.yaml --out outputs/story
  anystory storyboard official_script.json --character Max=max.png --character Ada=ada.png:ada_mask.png

The script format (characters, style, frames) is documented in anystory/storyboard.py.
Characters without an image are generated from their prompt first and cached in OUT/characters.""",
    "visualize": """examples:
  anystory visualize "on the left a red star; on the right a blue circle" --subject star.png --subject circle.png
  anystory visualize "..." --subject a.png --subject b.png --layers each --rows 10 --out maps.png

Rows are denoising steps, columns are U-Net stages (or every layer) plus the mean of all
layers; refined maps on the left, coarse on the right (paper Fig. 5).""",
    "segment": """examples:
  anystory segment photo.jpg --subject dog_ref.png --subject cat_ref.png --out outputs/masks
  anystory segment photo.jpg --subject dog_ref.png --strength 0.3 --prompt "a dog on a sofa"

The image is noised to --strength of the schedule and passed once through the U-Net with
the subjects; the router's maps give one mask per subject (paper §3.3).""",
    "evaluate": """examples:
  anystory evaluate --dataset dreambooth/dataset --dino models/dino-vits16 --clip models/clip-vit-base-patch32 \\
      --model ~/models/RealVisXL_V4.0 --out outputs/dreambench
  anystory evaluate ... --groups pairs.txt          # the multi-subject variant (one pair a line)
  anystory evaluate ... --subjects dog teapot --prompts 3   # a quick subset

Prints the table in the form of UNO's Table 1 (DINO, CLIP-I, CLIP-T). With --out, generated
images are kept there and a re-run resumes where it stopped.""",
    "mini evaluate": """examples:
  anystory mini evaluate                                   # all four claims, 200 generations per cell
  anystory mini evaluate --claims fidelity,text --count 50 --out outputs/quick
  anystory mini evaluate --claims routing --out outputs/mini_claims   # adds to claims.json there

Held-out identities, fixed seeds; claims.json, claims.md (the table) and one contact sheet
per claim (<claim>.png) go to --out. Definitions: anystory/mini/claims.py.""",
    "serve": """examples:
  anystory serve                       # mini world at http://127.0.0.1:7860
  anystory serve --tiny --port 7861    # random weights, to try the interface
  anystory serve --model ~/models/RealVisXL_V4.0 --adapter ... --image-encoder ... --device cuda

Binds to 127.0.0.1 unless --host says otherwise; uploads are limited by --max-file-size.""",
}


def _command(commands, name: str, help: str, examples: str | None = None) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help, description=help, epilog=EXAMPLES.get(examples or name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mini", help=MODEL_HELP)
    group.add_argument("--adapter", help="AnyStory adapter folder (default: MODEL/adapter when present)")
    group.add_argument("--image-encoder", help="CLIP vision encoder folder (default: MODEL/image_encoder when present)")
    group.add_argument("--base-config", help="for a single-file checkpoint: a local SDXL diffusers folder with its configs")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: the best available)")
    group.add_argument("--dtype", default="auto", choices=DTYPES, help="default: float16 on a GPU, float32 on the CPU")


def _subject_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--subject", action="append", default=[], required=required, metavar="IMAGE[:MASK]",
        help="a reference subject; repeat for several",
    )
    parser.add_argument(
        "--matting", default="auto", metavar="auto|none|NAME|DIR",
        help="masks for subjects given without one: auto (default backend), none (whole image), "
        "a registered backend name, 'rembg', or a local transformers segmentation model folder",
    )


def _sampling_options(parser: argparse.ArgumentParser, steps: int = 25) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same image")
    group.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    group.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    group.add_argument("--subject-scale", type=float, default=1.0, help="eta: strength of the subject condition (default 1)")
    group.add_argument("--reference-shift", type=float, default=None,
                       help="gamma: reference-attention shift (default: the adapter's calibrated value)")
    group.add_argument("--unconditional-references", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the references in CFG's unconditional branch (DESIGN default) or not, "
                            "so that guidance amplifies them (default: the adapter's setting)")
    group.add_argument("--height", type=int, help="output height, a multiple of 8 (default: the model's)")
    group.add_argument("--width", type=int, help="output width, a multiple of 8 (default: the model's)")
    group.add_argument("--negative-prompt", default="", help="what the image should not show")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anystory",
        description="AnyStory: personalized SDXL generation with one or many subjects.",
        epilog="Run `anystory COMMAND --help` for a command's options and examples. "
        "Set ANYSTORY_DEBUG=1 to see tracebacks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(commands, "demo", "run the pipeline end to end and write PNGs + an index page")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    generate = _command(commands, "generate", "generate an image with any number of reference subjects")
    generate.add_argument("prompt", help="what to draw; describe each subject by what it is (a dog, a cat)")
    _subject_options(generate)
    generate.add_argument("--no-router", action="store_true", help="subjects act everywhere (the blending baseline)")
    generate.add_argument("--layout", nargs="+", default=[], metavar="MASK", help="one mask per subject: place them yourself")
    generate.add_argument("--num-images", type=int, default=1, help="images from one call (OUT-1.png, OUT-2.png ...)")
    generate.add_argument("--out", default="anystory.png", help="output PNG (default: anystory.png)")
    generate.add_argument("--routing-maps", action="store_true", help="also save OUT_routing.png: who owns each region")
    _sampling_options(generate)
    _model_options(generate)
    generate.set_defaults(run=_generate)

    story = _command(commands, "storyboard", "generate every frame of a story script, and a contact sheet")
    story.add_argument("script", help="AnyStory YAML/JSON script or an official AnyStory release script")
    story.add_argument("--out", required=True, help="output folder: frames/, characters/, contact_sheet.png")
    story.add_argument("--character", action="append", default=[], metavar="ALIAS=IMAGE[:MASK]",
                       help="give a character a reference image instead of its prompt")
    story.add_argument("--batch-size", type=int, default=1, help="frames generated together (same cast)")
    story.add_argument("--no-router", action="store_true")
    story.add_argument("--matting", default="auto", metavar="auto|NAME|DIR",
                       help="masks for references given without one and for created characters")
    _sampling_options(story)
    _model_options(story)
    story.set_defaults(run=_storyboard)

    visualize = _command(commands, "visualize", "draw the routing maps over steps and layers (paper Fig. 5)")
    visualize.add_argument("prompt", help="what to draw")
    _subject_options(visualize, required=True)
    visualize.add_argument("--out", default="routing_grid.png", help="grid PNG; the image goes to OUT_image.png")
    visualize.add_argument("--rows", type=int, default=5, help="denoising steps shown (default 5)")
    visualize.add_argument("--layers", choices=("stages", "each"), default="stages", help="one column per U-Net stage or per layer")
    visualize.add_argument("--cell", type=int, default=96, help="cell size in pixels")
    _sampling_options(visualize)
    _model_options(visualize)
    visualize.set_defaults(run=_visualize)

    seg = _command(commands, "segment", "find reference subjects in an existing image (routing-map masks)")
    seg.add_argument("image", help="the existing image to find the subjects in")
    _subject_options(seg, required=True)
    seg.add_argument("--out", default="segments", help="output folder: one mask PNG per subject + overlay.png")
    seg.add_argument("--prompt", default="", help="optional caption of the image")
    seg.add_argument("--strength", type=float, default=0.5, help="noise level in (0, 1] (default 0.5)")
    seg.add_argument("--steps", type=int, default=25, help="schedule the noise level is picked from")
    seg.add_argument("--resolution", type=int, help="longer side processed (default: the model's)")
    seg.add_argument("--seed", type=int, default=0)
    _model_options(seg)
    seg.set_defaults(run=_segment)

    ev = _command(commands, "evaluate", "DreamBench evaluation (DINO, CLIP-I, CLIP-T) as in UNO's Table 1")
    ev.add_argument("--dataset", required=True, help="DreamBench folder: subject folders + prompts_and_classes.txt")
    ev.add_argument("--dino", required=True, help="local DINO ViT-S/16 folder")
    ev.add_argument("--clip", required=True, help="local CLIP model folder (CLIP-I and CLIP-T)")
    ev.add_argument("--subjects", nargs="+", metavar="NAME", help="only these subjects")
    ev.add_argument("--groups", help="multi-subject variant: a file with one group of subjects a line")
    ev.add_argument("--prompts", type=int, help="only the first N prompts of each subject")
    ev.add_argument("--images-per-prompt", type=int, default=1)
    ev.add_argument("--method", default="AnyStory", help="the row name in the table")
    ev.add_argument("--out", help="keep generated images (resumable) and scores.json here")
    ev.add_argument("--metrics-device", default="cpu")
    ev.add_argument("--matting", default="auto", help="masks for the reference photos (see generate)")
    _sampling_options(ev)
    _model_options(ev)
    ev.set_defaults(run=_evaluate)

    mini = _command(commands, "mini", "the mini world: the paper's claims measured on the bundled weights")
    mini_commands = mini.add_subparsers(dest="mini_command", required=True, metavar="COMMAND")
    claims = _command(mini_commands, "evaluate", "the paper's Figs. 3-6 as numbers on held-out identities", "mini evaluate")
    claims.add_argument("--count", type=int, default=200, help="generations (scenes for routing) per cell (default 200)")
    claims.add_argument("--out", default="outputs/mini_claims", help="output folder (default: outputs/mini_claims)")
    claims.add_argument("--claims", default="fidelity,blending,routing,text",
                        help="comma-separated subset of fidelity,blending,routing,text (default: all)")
    claims.add_argument("--seed", type=int, help="seed of the cases and the sampling noise (default: the published one)")
    claims.add_argument("--weights", help="mini weights folder with base/, adapter/, adapter_clip_only/ (default: bundled)")
    claims.set_defaults(run=_mini_evaluate)

    serve = _command(commands, "serve", "start the web UI")
    serve.add_argument("--tiny", action="store_true", help="run on tiny random weights (same as --model tiny)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--max-file-size", default="10mb", help="upload limit (default 10mb)")
    serve.add_argument("--queue-size", type=int, default=16, help="requests that may wait (default 16)")
    _model_options(serve)
    serve.set_defaults(run=_serve)

    commands.add_parser("train", help="train stage 1 or stage 2: anystory train stage1|stage2 --config FILE [key=value ...]",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return _train(argv)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("anystory: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError, FloatingPointError) as error:
        if os.environ.get("ANYSTORY_DEBUG"):
            raise
        print(f"anystory: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


if __name__ == "__main__":
    sys.exit(main())
