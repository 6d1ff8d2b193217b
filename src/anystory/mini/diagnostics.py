"""Probes that say *why* a claim falls short; all but the last two without sampling an image.

`reference_gain` asks whether the subject encoder carries an identity's fine detail at
all. Teacher forcing on held-out single-subject targets: the target is noised to a
fixed timestep and the U-Net predicts the noise once with the subject's true reference,
once with a *twin* reference (the very same render with another pattern: same shape,
colour, pose, background), and once with no subject. If the adapter uses the pattern,
the true reference lowers the error on the target's subject pixels below the twin's;
the relative difference is the gain. Sampling-based claims (fidelity) need this gain to
be well above zero, and it can be read early in a training run, in seconds.

`position_probe` asks whether the base U-Net could find the right place to copy from.
The reference attention can carry a pattern cell only if a target token's query and a
reference token's key both say where in its subject the token lies; they are linear
maps of the attention's input, so the probe fits a ridge regression from those inputs
to the token's coordinates in its subject's frame, on held-out scenes, and reports the
held-out R^2 per transformer block and timestep (1: fully readable, 0: not at all).

`pattern_visibility` checks the world's own premise: the fine detail should be beyond what
the low-resolution vision encoder resolves, so that only the ReferenceNet can carry it
(the CLIP-only ablation's handicap). It fits a ridge classifier from the CLIP states the
subject QFormer reads to the 9 pattern bits on training identities and reports the bit
accuracy on held-out ones (0.5: invisible, 1: fully resolved). Beside it, the same
readout of the encoder's own input pixels, at its input size and smaller: what any
encoder of that resolution could resolve, in the flip-invariant bits the states are read
in (a linear map cannot undo a mirror image, so these stay below 1) and in the bits as
the image shows them.

`router_inputs` asks what the router can route by. Its maps are inner products of the
routing features with each position's attn2 input Z^l alone (paper §3.3), so two subjects
can be told apart only by what Z^l says at each of their cells. On the routing claim's
held-out scenes, noised to one step, it fits a ridge classifier from Z^l at every
subject cell (the layer's grid, masks area-downsampled as `routing_iou` does) to that
subject's shape and to its colour, on half the scenes, and reports the accuracy on the
others per routed layer (chance: 1/5 for shape, 1/6 for colour).

`side_readings` asks where two-subject prompts go wrong, on pairs that differ in shape
or colour (so no twin confusion is involved): it samples them with the router, without
it and with the base alone, and reads each side's region against the caption's subject
on that side: its shape and colour (the base's binding of text to place) and its pattern
(the copying), which Fig. 4's order-free blending verdict does not separate.

`layout_readings` splits the blending claim into routing and copying: it samples the
twin prompts of Fig. 4 once with the router and once with each scene's true instance
masks as the layout (a perfect router), and judges both like `claims.no_blending`. What
the true masks score bounds what any router can reach with this subject encoder.

`fixed_layout_readings` takes the base's layout out of the twin prompts: each scene is
drawn with its subjects' bodies in plain colour (no pattern), noised to a step of the
schedule and sampled from there, so that every subject is where its mask says from the
first step on. It reads each twin in the region over its own mask, with both references
(true masks or the router) and with the first reference alone: beside the other twin's
plain body or in a scene of its own, under the pair's caption or its own. What the
alone cells lose against each other tells what a second subject costs the copying.

`routing_ceilings` asks what the routing claim's measure allows at all, with no model:
the mean IoU of a router that finds every subject's cells exactly but tells some
subjects apart only at chance, on the claim's own scenes. Twins differ only in the
pattern, which the world makes invisible to the vision encoder the routing features
come from, so the best such a router can expect for each twin is 1/2 (the pair's two
regions given the right way round or swapped). A router that reads only colour per
position (what `router_inputs` finds in the mini U-Net) can expect 1/k for a subject
sharing its colour with k - 1 others. Given a claims file, it also reads the measured
refined IoU per step at the noise level SDXL's 128 x 128 latent would see: at one
sigma, a subject of the same share of the image covers 64 times as many latent cells
there, so its mean holds the noise of sigma / 8 here.

    python -m anystory.mini.diagnostics [--probe gain|position|pattern|router|sides|layout|fixed|ceilings] [--weights DIR] [--adapter adapter] [--count 48]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from ..models import AnyStoryState
from ..models.topology import transformer_blocks
from ..pipelines.components import text_conditions, vae_latents
from ..segment import segment
from ..subject import Subject, latent_mask
from . import WEIGHTS_DIR, load_pipeline
from .claims import (
    SAMPLING, SEED, Group, PairVerdict, uint8_images, generate, judge_pair, pair_groups, routing_scenes,
    single_subject_groups,
)
from .evaluator import MiniEvaluator, RegionReading
from .models import build_sampling_scheduler
from .world import COLOURS, IMAGE_SIZE, SHAPES, Identity, MiniWorld, Render, palette, pattern_bits, to_tensor

PROBE_TIMESTEPS = (100, 300, 500, 700)
ARMS = ("true", "twin", "none")  # the reference given: the subject's own, a twin's, or no subject


@dataclass
class ReferenceGain:
    count: int
    subject_scale: float
    errors: dict[str, dict[int, float]]  # arm -> timestep -> mean squared noise error on subject pixels
    gain: dict[int, float]  # timestep -> 1 - error(true) / error(twin)


def twin_reference(world: MiniWorld, group: Group) -> Render:
    """The group's reference render with the identity swapped for a same-attribute one:
    only the pattern differs, pixel for pixel."""
    truth, reference = group.identities[0], group.references[0]
    twin = next(c for c in group.candidates[0] if c != truth)
    placement = replace(reference.scene.placements[0], identity=twin)
    return world.render(replace(reference.scene, placements=(placement,)))


@torch.no_grad()
def reference_gain(pipe, count: int = 48, timesteps: tuple[int, ...] = PROBE_TIMESTEPS, seed: int = SEED,
                   subject_scale: float = 1.0) -> ReferenceGain:
    """The teacher-forced probe of the module docstring, over `count` held-out targets.
    `subject_scale=0` silences the CLIP branch and so measures the ReferenceNet alone."""
    world, device, dtype = MiniWorld(), pipe._execution_device, pipe.unet.dtype
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sums = {arm: {t: [0.0, 0.0] for t in timesteps} for arm in ARMS}  # error sum, subject-pixel count
    for group in single_subject_groups(count, seed, stream="fidelity"):
        targets = [world.render(scene) for scene in group.scenes]
        pixels = torch.stack([to_tensor(t.image) for t in targets]).to(device)
        latents = vae_latents(pipe.vae, pixels).to(dtype)
        masks = torch.stack([torch.from_numpy(t.masks[:1]).float() for t in targets]).to(device)
        masks = latent_mask(masks, latents.shape[-2:])[:, 0]
        conditions = text_conditions(pipe, group.prompts, tuple(pixels.shape[-2:]), device)
        references = {"true": group.references[0], "twin": twin_reference(world, group)}
        states = {arm: _state(pipe, render, latents, subject_scale) for arm, render in references.items()}
        generator = torch.Generator().manual_seed(group.seed)
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
            step = torch.full((latents.shape[0],), t, device=device)
            noisy = scheduler.add_noise(latents, noise, step)
            for arm in ARMS:
                extra = {"cross_attention_kwargs": {"anystory": states[arm]}} if arm in states else {}
                prediction = pipe.unet(noisy, step, **conditions, **extra).sample
                error = (prediction.float() - noise.float()).pow(2).mean(dim=1)
                sums[arm][t][0] += float((error * masks).sum())
                sums[arm][t][1] += float(masks.sum())
    errors = {arm: {t: total / max(n, 1e-8) for t, (total, n) in per_t.items()} for arm, per_t in sums.items()}
    gain = {t: 1.0 - errors["true"][t] / errors["twin"][t] for t in timesteps}
    return ReferenceGain(count, subject_scale, errors, gain)


def _state(pipe, reference: Render, latents: torch.Tensor, subject_scale: float) -> AnyStoryState:
    """One subject everywhere (no router, as in stage 1), for every row of the batch."""
    encodings = pipe.encode_subjects([Subject(reference.image, reference.masks[0])])
    return AnyStoryState.from_encodings(
        encodings.to(latents.device, latents.dtype), batch_size=latents.shape[0],
        latent_size=tuple(latents.shape[-2:]), use_router=False, subject_scale=subject_scale,
    )


@dataclass
class PositionProbe:
    count: int
    side: dict[int, int]  # transformer block -> side of its token grid
    r2: dict[int, dict[int, float]]  # timestep -> block -> held-out R^2 of the tokens' (u, v)


def token_coordinates(render: Render, side: int) -> tuple[np.ndarray, np.ndarray]:
    """For a `side` x `side` token grid over a single-subject render: which tokens (row-major)
    have their centre on the subject, and those tokens' (u, v) in the subject's frame, with
    the image's handedness (a flip shows only through the pattern being copied)."""
    centres = (np.arange(side) + 0.5) * IMAGE_SIZE / side
    u, v = render.scene.placements[0].body_frame(centres[None, :], centres[:, None], unflip=False)
    pixel = centres.astype(int)
    on_subject = render.masks[0][np.ix_(pixel, pixel)]
    return on_subject.reshape(-1), np.stack([u[on_subject], v[on_subject]], axis=1)


def ridge_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """Predictions on `test_x` of a ridge regression with intercept fitted on the training
    pair; `alpha` is relative to the features' mean energy, so it means the same at every width."""
    mean = train_x.mean(0)

    def design(x: np.ndarray) -> np.ndarray:
        return np.c_[x - mean, np.ones(len(x))]

    inputs = design(train_x)
    gram = inputs.T @ inputs
    ridge = alpha * np.trace(gram[:-1, :-1]) / max(gram.shape[0] - 1, 1)
    weights = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), inputs.T @ train_y)
    return design(test_x) @ weights


def ridge_r2(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             alpha: float = 0.1) -> float:
    """Held-out R^2 of `ridge_predict`, averaged over the target columns."""
    residual = ((ridge_predict(train_x, train_y, test_x, alpha) - test_y) ** 2).sum(0)
    return float((1.0 - residual / ((test_y - test_y.mean(0)) ** 2).sum(0)).mean())


PIXEL_SIZES = (16, 8, 4)  # CLIP input sizes whose raw pixels the pattern probe reads


@dataclass
class PatternVisibility:
    train: int
    held_out: int
    bit_accuracy: float  # held-out identities, chance 0.5
    pixel_bit_accuracy: dict[int, float]  # input size -> the same bits read from the crop's pixels
    pixel_image_bit_accuracy: dict[int, float]  # input size -> the bits as the image shows them


@dataclass
class _PatternSamples:
    states: np.ndarray  # (n, tokens * width) the CLIP states the QFormer reads
    pixels: dict[int, np.ndarray]  # size -> (n, 3 * size * size) the encoder's input at that size
    bits: np.ndarray  # (n, 9) flip-invariant (the identity's canonical pattern)
    image_bits: np.ndarray  # (n, 9) as drawn (mirrored in flipped subjects)


@torch.no_grad()
def pattern_visibility(pipe, train: int = 1500, held_out: int = 400, seed: int = SEED) -> PatternVisibility:
    """The premise check of the module docstring: renders of single subjects, segmented as
    a user's references are, through the pipeline's own CLIP path."""
    fit, test = (_pattern_samples(pipe, split, n, seed + i)
                 for i, (split, n) in enumerate((("train", train), ("held_out", held_out))))
    return PatternVisibility(
        train, held_out, _bit_accuracy(fit.states, fit.bits, test.states, test.bits),
        {size: _bit_accuracy(fit.pixels[size], fit.bits, test.pixels[size], test.bits) for size in PIXEL_SIZES},
        {size: _bit_accuracy(fit.pixels[size], fit.image_bits, test.pixels[size], test.image_bits) for size in PIXEL_SIZES},
    )


def _bit_accuracy(train_x: np.ndarray, train_bits: np.ndarray, test_x: np.ndarray, test_bits: np.ndarray) -> float:
    predicted = ridge_predict(train_x, train_bits * 2.0 - 1.0, test_x)
    return float(((predicted > 0) == test_bits.astype(bool)).mean())


def _pattern_samples(pipe, split: str, count: int, seed: int) -> _PatternSamples:
    world, rng = MiniWorld(), np.random.default_rng(seed)
    renders = [world.render(world.sample_scene(rng, world.sample_identities(rng, 1, split)))
               for _ in range(count)]
    subjects = [Subject(Image.fromarray(r.image), r.masks[0]) for r in renders]
    states = pipe._clip_states(subjects, pipe._execution_device)[:-1].float().flatten(1).cpu().numpy()
    mean, std = pipe.feature_extractor.image_mean, pipe.feature_extractor.image_std
    pixels = {size: torch.stack([s.clip_pixels(size, mean, std) for s in subjects]).flatten(1).numpy()
              for size in PIXEL_SIZES}
    placements = [r.scene.placements[0] for r in renders]
    return _PatternSamples(states, pixels, np.stack([pattern_bits(p.identity.pattern) for p in placements]),
                           np.stack([pattern_bits(p.image_pattern) for p in placements]))


@torch.no_grad()
def position_probe(pipe, count: int = 96, timesteps: tuple[int, ...] = (0, *PROBE_TIMESTEPS),
                   seed: int = SEED) -> PositionProbe:
    """The probe of the module docstring on the pipeline's U-Net alone (no subject): fitted
    on the first half of `count` held-out single-subject scenes, scored on the second.
    t = 0 is what the ReferenceNet, a copy of this U-Net, starts from."""
    world, device, dtype = MiniWorld(), pipe._execution_device, pipe.unet.dtype
    renders = [world.render(scene) for group in single_subject_groups(count, seed, stream="fidelity")
               for scene in group.scenes]
    pixels = torch.stack([to_tensor(r.image) for r in renders]).to(device)
    latents = vae_latents(pipe.vae, pixels).to(dtype)
    conditions = text_conditions(pipe, [r.caption for r in renders], tuple(pixels.shape[-2:]), device)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    r2: dict[int, dict[int, float]] = {}
    with captured_inputs(pipe, "attn1") as inputs:
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + t)).to(device, dtype)
            step = torch.full((latents.shape[0],), t, device=device)
            pipe.unet(scheduler.add_noise(latents, noise, step), step, **conditions)
            r2[t] = {block: _held_out_r2(states.numpy(), renders) for block, states in inputs.items()}
    side = {block: int(round(states.shape[1] ** 0.5)) for block, states in inputs.items()}
    return PositionProbe(len(renders), side, r2)


@contextmanager
def captured_inputs(pipe, attention: str) -> Iterator[dict[int, torch.Tensor]]:
    """While open, the dict holds the hidden states (float, CPU) that last entered each
    transformer block's `attention` ("attn1" or "attn2"), by block index."""
    inputs: dict[int, torch.Tensor] = {}

    def capture(block: int):
        def hook(module, args, kwargs):
            inputs[block] = (args[0] if args else kwargs["hidden_states"]).float().cpu()
        return hook

    handles = [getattr(b, attention).register_forward_pre_hook(capture(i), with_kwargs=True)
               for i, b in enumerate(transformer_blocks(pipe.unet))]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _held_out_r2(states: np.ndarray, renders: list[Render]) -> float:
    """states: (scenes, tokens, channels); fit on the first half of the scenes."""
    side = int(round(states.shape[1] ** 0.5))
    features, targets = [], []
    for scene_states, render in zip(states, renders):
        on_subject, coordinates = token_coordinates(render, side)
        features.append(scene_states[on_subject])
        targets.append(coordinates)
    half = len(renders) // 2
    return ridge_r2(np.concatenate(features[:half]), np.concatenate(targets[:half]),
                    np.concatenate(features[half:]), np.concatenate(targets[half:]))


@dataclass
class RouterInputs:
    count: int
    step: int  # of the 25-step schedule, 0 = most noise (the routing claim's steps)
    side: dict[int, int]  # routed layer -> its grid side
    shape: dict[int, float]  # routed layer -> held-out accuracy, chance 0.2
    colour: dict[int, float]  # chance 1/6


def ridge_accuracy(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
                   classes: int) -> float:
    """Held-out accuracy of a one-vs-all ridge classifier (`ridge_predict` on one-hot labels)."""
    scores = ridge_predict(train_x, np.eye(classes)[train_labels], test_x)
    return float((scores.argmax(1) == test_labels).mean())


def subject_cells(masks: np.ndarray, side: int) -> list[np.ndarray]:
    """Per subject, the flat indices of the cells of a side x side grid it covers (area >= 0.5)."""
    cover = F.interpolate(torch.from_numpy(masks).float()[None], size=(side, side), mode="area")[0] >= 0.5
    return [np.flatnonzero(c.numpy()) for c in cover]


@torch.no_grad()
def router_inputs(pipe, count: int = 48, step: int = 24, steps: int = 25, seed: int = SEED) -> RouterInputs:
    """The probe of the module docstring: fitted on the first half of the scenes."""
    world = MiniWorld()
    cells: dict[int, dict[str, list]] = {}
    with captured_inputs(pipe, "attn2") as inputs:
        for index, group in enumerate(routing_scenes(count, seed)):
            truth = world.render(group.scenes[0])
            segment(pipe, truth.image, group.subjects, prompt=truth.caption, strength=1 - step / steps,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(group.seed))
            for block, states in inputs.items():
                found = cells.setdefault(block, {"x": [], "shape": [], "colour": [], "scene": []})
                side = int(round(states.shape[1] ** 0.5))
                for identity, positions in zip(group.identities, subject_cells(truth.masks, side)):
                    found["x"].append(states[0, positions].numpy())
                    found["shape"] += [SHAPES.index(identity.shape)] * len(positions)
                    found["colour"] += [COLOURS.index(identity.colour)] * len(positions)
                    found["scene"] += [index] * len(positions)
    readings = {"shape": {}, "colour": {}}
    for block, found in cells.items():
        x, train = np.concatenate(found["x"]), np.array(found["scene"]) < count // 2
        for attribute, classes in (("shape", len(SHAPES)), ("colour", len(COLOURS))):
            labels = np.array(found[attribute])
            readings[attribute][block] = ridge_accuracy(x[train], labels[train], x[~train], labels[~train], classes)
    side = {block: int(round(inputs[block].shape[1] ** 0.5)) for block in cells}
    return RouterInputs(count, step, side, readings["shape"], readings["colour"])


@dataclass
class RoutingCeilings:
    count: int
    twins_at_chance: float  # exact cells, twins given the right way round half the time
    colour_at_chance: float  # exact cells, same-colour subjects told apart at chance
    sdxl_noise_per_step: list[float] | None  # measured per-step IoU read at sigma / SDXL_LATENT_RATIO
    sdxl_noise_mean: float | None


SDXL_LATENT_RATIO = 8  # SDXL's 128 x 128 latent against the mini world's 16 x 16


def chance_iou(identities: Sequence[Identity], key: Callable[[Identity], tuple]) -> float:
    """Mean over the subjects of 1 / (how many subjects share its `key`): the expected
    IoU of exact regions handed out at random among the subjects a router cannot tell apart."""
    keys = [key(i) for i in identities]
    return float(np.mean([1 / keys.count(k) for k in keys]))


def noise_matched(per_step: Sequence[float], sigmas: np.ndarray, ratio: float = SDXL_LATENT_RATIO) -> list[float]:
    """`per_step` (IoU at each sampling sigma, most noise first) read by log-sigma
    interpolation at sigma / ratio; below the last sigma, the last step's value."""
    log_sigma = np.log(sigmas[: len(per_step)])[::-1]
    return list(np.interp(np.log(sigmas[: len(per_step)] / ratio), log_sigma, np.asarray(per_step)[::-1]))


def routing_ceilings(count: int = 200, per_step: Sequence[float] | None = None, seed: int = SEED) -> RoutingCeilings:
    """The module docstring's model-free bounds on the routing claim's scenes."""
    casts = [group.identities for group in routing_scenes(count, seed)]
    twins = float(np.mean([chance_iou(c, lambda i: (i.shape, i.colour)) for c in casts]))
    colour = float(np.mean([chance_iou(c, lambda i: (i.colour,)) for c in casts]))
    matched = None
    if per_step is not None:
        scheduler = build_sampling_scheduler()
        scheduler.set_timesteps(len(per_step))
        matched = noise_matched(per_step, scheduler.sigmas.numpy())
    return RoutingCeilings(count, twins, colour, matched, float(np.mean(matched)) if matched else None)


SIDE_CELLS = {"router": dict(use_router=True), "no_router": dict(use_router=False), "base": dict(personalized=False)}


@dataclass
class SideReadings:
    count: int
    two_regions: dict[str, float]  # per cell: at least two subject regions found
    attributes: dict[str, float]  # per cell and side: shape and colour of the caption's subject there
    identity: dict[str, float]  # per cell and side: the pattern of the caption's subject there


def read_sides(regions: list[RegionReading], candidates, identities) -> list[tuple[bool, bool]]:
    """(attributes right, identity right) for the two largest regions, left to right,
    against the caption's subjects in the same order; [] when fewer than two are found."""
    largest = sorted(regions, key=lambda r: -int(r.mask.sum()))[:2]
    if len(largest) < 2:
        return []
    ordered = sorted(largest, key=lambda r: float(np.nonzero(r.mask)[1].mean()))
    return [((r.shape, r.colour) == (truth.shape, truth.colour), candidates[r.identify(candidates)] == truth)
            for r, truth in zip(ordered, identities)]


def side_readings(pipe, evaluator: MiniEvaluator, count: int = 80, seed: int = SEED) -> SideReadings:
    """The module docstring's fourth probe, on `count` held-out non-twin prompts."""
    found = {cell: [] for cell in SIDE_CELLS}
    sides = {cell: [] for cell in SIDE_CELLS}
    for group in pair_groups(count, seed, twins=False):
        for cell, options in SIDE_CELLS.items():
            for k, reading in enumerate(evaluator.read(generate(pipe, group, **options).images)):
                readings = read_sides(reading.regions, group.candidates[k], group.identities)
                found[cell].append(bool(readings))
                sides[cell].extend(readings)
    return SideReadings(
        count, {c: float(np.mean(v)) for c, v in found.items()},
        {c: float(np.mean([a for a, _ in v])) if v else 0.0 for c, v in sides.items()},
        {c: float(np.mean([i for _, i in v])) if v else 0.0 for c, v in sides.items()},
    )


LAYOUT_CELLS = ("true_masks", "router")


@dataclass
class LayoutReadings:
    count: int
    both_correct: dict[str, float]  # per cell, as `claims.Blending`
    blending: dict[str, float]


def true_layout(group: Group, scene) -> list[np.ndarray]:
    """The scene's instance masks in the order of the group's references."""
    render = MiniWorld().render(scene)
    owner = [p.identity for p in scene.placements]
    return [render.masks[owner.index(identity)] for identity in group.identities]


def layout_readings(pipe, evaluator: MiniEvaluator, count: int = 80, seed: int = SEED) -> LayoutReadings:
    """The module docstring's last probe, on the first `count` twin prompts of Fig. 4;
    one call per prompt, so that both cells start from the same noise."""
    verdicts: dict[str, list[PairVerdict]] = {cell: [] for cell in LAYOUT_CELLS}
    for group in pair_groups(count, seed):
        for scene, candidates in zip(group.scenes, group.candidates):
            single = replace(group, scenes=[scene], candidates=[candidates])
            options = {"true_masks": dict(subject_masks=true_layout(group, scene)), "router": dict(use_router=True)}
            for cell in LAYOUT_CELLS:
                regions = evaluator.read(generate(pipe, single, **options[cell]).images)[0].regions
                verdicts[cell].append(judge_pair(regions, candidates, group.identities))
    return LayoutReadings(
        count, *({c: float(np.mean([getattr(v, key) for v in vs])) for c, vs in verdicts.items()}
                 for key in ("both_correct", "blended"))
    )


# The fixed-layout probe's cells: which references, which scene, which caption, what route.
FIXED_LAYOUT_CELLS = {
    "pair, true masks": dict(subjects=2, scene="pair", caption="pair", route="masks"),
    "pair, router": dict(subjects=2, scene="pair", caption="pair", route="router"),
    "first alone, beside the other body": dict(subjects=1, scene="pair", caption="pair", route="everywhere"),
    "first alone, beside the other body, its own caption": dict(subjects=1, scene="pair", caption="solo", route="everywhere"),
    "first alone, the pair's caption": dict(subjects=1, scene="solo", caption="pair", route="everywhere"),
    "first alone": dict(subjects=1, scene="solo", caption="solo", route="everywhere"),
}


@dataclass
class FixedLayoutReadings:
    count: int
    start_step: int
    sigma: float  # the noise level sampling starts from
    first_right: dict[str, float]  # per cell: the first twin's region recognised as it
    second_right: dict[str, float]  # per two-reference cell: the same for the second twin
    both_correct: dict[str, float]  # per two-reference cell, as `claims.Blending`


def plain_bodies(render: Render) -> np.ndarray:
    """The render with every subject in its body colour alone: the layout, no identity."""
    image = render.image.copy()
    for placement, mask in zip(render.scene.placements, render.masks):
        image[mask] = palette(placement.identity.colour)[0]
    return image


def schedule_tail(start_step: int, steps: int = SAMPLING["num_inference_steps"]) -> list[float]:
    """The sampling schedule's sigmas from `start_step` on, its final zero included."""
    scheduler = build_sampling_scheduler()
    scheduler.set_timesteps(steps)
    return [float(sigma) for sigma in scheduler.sigmas[start_step:]]


def noised_start(pipe, image: np.ndarray, sigmas: list[float], generator: torch.Generator) -> torch.Tensor:
    """`image`'s latents noised to the first of `sigmas`, as the pipeline's `latents=` takes
    them (it multiplies them by its scheduler's initial noise scale)."""
    latents = vae_latents(pipe.vae, to_tensor(image)[None].to(pipe._execution_device))
    noised = latents + sigmas[0] * torch.randn(latents.shape, generator=generator).to(latents)
    scheduler = build_sampling_scheduler()
    scheduler.set_timesteps(sigmas=sigmas)
    return noised / scheduler.init_noise_sigma


def _owned_identity(regions: list[RegionReading], mask: np.ndarray, candidates: Sequence[Identity]) -> Identity | None:
    """The identity read in the region covering most of `mask` (at least 30 % of it)."""
    best = max(regions, key=lambda r: int((r.mask & mask).sum()), default=None)
    if best is None or (best.mask & mask).sum() < 0.3 * mask.sum():
        return None
    return candidates[best.identify(candidates)]


@torch.no_grad()
def fixed_layout_readings(pipe, evaluator: MiniEvaluator, count: int = 200, start_step: int = 6,
                          seed: int = SEED) -> FixedLayoutReadings:
    """The module docstring's fixed-layout probe, on the first `count` twin prompts of Fig. 4."""
    world, sigmas = MiniWorld(), schedule_tail(start_step)
    options = {k: v for k, v in SAMPLING.items() if k != "num_inference_steps"}
    right: dict[str, list[list[bool]]] = {cell: [] for cell in FIXED_LAYOUT_CELLS}
    both: dict[str, list[bool]] = {cell: [] for cell, c in FIXED_LAYOUT_CELLS.items() if c["subjects"] == 2}
    for group in pair_groups(count, seed):
        for index, (scene, candidates) in enumerate(zip(group.scenes, group.candidates)):
            first = next(p for p in scene.placements if p.identity == group.identities[0])
            scenes = {"pair": scene, "solo": replace(scene, placements=(first,))}
            renders = {name: world.render(s) for name, s in scenes.items()}
            masks = true_layout(group, scene)
            for cell, c in FIXED_LAYOUT_CELLS.items():
                generator = torch.Generator().manual_seed(group.seed + index)  # every cell: the same noise
                route = {"masks": dict(subject_masks=masks[: c["subjects"]]), "router": dict(use_router=True),
                         "everywhere": {}}[c["route"]]
                image = pipe([scenes[c["caption"]].caption], subjects=group.subjects[: c["subjects"]],
                             latents=noised_start(pipe, plain_bodies(renders[c["scene"]]), sigmas, generator),
                             sigmas=sigmas, **options, **route).images
                regions = evaluator.read(uint8_images(image))[0].regions
                right[cell].append([_owned_identity(regions, m, candidates) == truth
                                    for m, truth in zip(masks[: c["subjects"]], group.identities)])
                if cell in both:
                    both[cell].append(judge_pair(regions, candidates, group.identities).both_correct)
    return FixedLayoutReadings(
        sum(len(g.scenes) for g in pair_groups(count, seed)), start_step, sigmas[0],
        {cell: float(np.mean([r[0] for r in rs])) for cell, rs in right.items()},
        {cell: float(np.mean([r[1] for r in right[cell]])) for cell in both},
        {cell: float(np.mean(v)) for cell, v in both.items()},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", choices=("gain", "position", "pattern", "router", "sides", "layout", "fixed", "ceilings"), default="gain")
    parser.add_argument("--step", type=int, default=None, help="the step of the 25 the scenes are noised to "
                        "(router probe: default 24; fixed probe: where sampling starts, default 6)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder holding base/ and the adapter")
    parser.add_argument("--adapter", default="adapter", help="adapter folder: a name inside --weights, or a path")
    parser.add_argument("--count", type=int, default=48, help="held-out targets (scenes)")
    parser.add_argument("--subject-scale", type=float, default=1.0, help="eta; 0 probes the ReferenceNet alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--claims", type=Path, help="ceilings probe: a claims.json of `anystory mini evaluate` "
                        "whose per-step routing to read at SDXL's noise")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe == "ceilings":
        per_step = json.loads(args.claims.read_text())["routing"]["result"]["refined_per_step"] if args.claims else None
        print(json.dumps(asdict(routing_ceilings(args.count, per_step)), indent=2))
        return
    pipe = load_pipeline(args.adapter, args.weights)
    if args.probe == "position":
        result = position_probe(pipe, args.count)
    elif args.probe == "pattern":
        result = pattern_visibility(pipe)
    elif args.probe == "router":
        result = router_inputs(pipe, args.count, 24 if args.step is None else args.step)
    elif args.probe == "fixed":
        pipe.set_progress_bar_config(disable=True)
        result = fixed_layout_readings(pipe, MiniEvaluator.from_pretrained(), args.count, 6 if args.step is None else args.step)
    elif args.probe in ("sides", "layout"):
        pipe.set_progress_bar_config(disable=True)
        probe = side_readings if args.probe == "sides" else layout_readings
        result = probe(pipe, MiniEvaluator.from_pretrained(), args.count)
    else:
        result = reference_gain(pipe, args.count, subject_scale=args.subject_scale)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
