"""The mini world: a seeded procedural world of patterned shapes, rendered at 64 x 64.

A subject's identity is a captioned part (shape and colour, which captions name) plus a
fine part no caption names: a 3 x 3 binary pattern of light and dark cells on its body.
Captions and a low-resolution semantic encoder can tell a red heart from a blue circle,
but only the pixels can tell two red hearts apart, which is exactly the detail the
paper's ReferenceNet is meant to carry.

Layout rules that the rest of the project relies on:
- the pattern grid covers 65 % of the subject's size, so cells are >= 5 px for the
  smallest two-subject scenes and about 7 px for single subjects;
- subjects never overlap (a 2 px gap at least), so instance masks are whole-instance
  masks and connected components of the foreground separate them;
- a subject's position word is the third of the image holding its centre;
- captions are position-first ("on the left, a red heart; ...") because CLIP text
  encoders are causal: a colour word cannot see a position word that follows it.

Identities whose pattern (up to mirroring) is in `HELD_OUT_PATTERNS` never appear in
training samples; they are for evaluation only. The split is a module constant so that
every `MiniWorld` seed, the shipped weights and the evaluation agree on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "hexagon", "heart", "cross")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple")
BACKGROUNDS = ("beach", "forest", "snow", "city", "night", "desert")
POSITIONS = ("left", "middle", "right")
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
VOCABULARY = tuple(
    sorted(
        {"on", "in", "the", "a", "background", *POSITIONS, *SHAPES, *COLOURS, *BACKGROUNDS}
    )
)
PATTERN_BITS = 9
MAX_SUBJECTS = 3
Split = Literal["train", "held_out"]

# Hue-spaced body colours; light and dark tints of each paint the pattern cells.
_RGB = {
    "red": (215, 45, 45),
    "yellow": (225, 195, 30),
    "green": (45, 165, 65),
    "cyan": (35, 180, 195),
    "blue": (45, 75, 215),
    "purple": (155, 60, 195),
}
_LIGHT, _DARK = 0.5, 0.45  # light = towards white by 50 %, dark = 45 % of the colour
_GRID_HALF = 0.65  # pattern grid half-extent, in units of the subject's half-size
_GRID_CENTRE_V = {"heart": -0.1}  # vertical grid offset so every cell sits on the body
_MAX_ANGLE = 15.0  # degrees; small enough that the grid's orientation stays unambiguous
_EXTENT = 1.06  # half-extent of any rotated shape, in half-sizes (a 15 deg square)
_GAP = 2.0  # pixels between subjects
_SIZE_RANGE = {1: (26.0, 36.0), 2: (22.0, 28.0), 3: (17.0, 20.0)}
_SLOTS = {1: None, 2: ("left", "right"), 3: ("left", "middle", "right")}
_TEXTURE_VARIANTS = 16


# --------------------------------------------------------------------------- identities


def mirror_pattern(pattern: int) -> int:
    """The pattern seen in a horizontally flipped subject (columns swapped)."""
    out = 0
    for row in range(3):
        for col in range(3):
            if pattern >> (row * 3 + col) & 1:
                out |= 1 << (row * 3 + 2 - col)
    return out


def canonical_pattern(pattern: int) -> int:
    """A flip-invariant name for a pattern: a flipped subject keeps its identity."""
    return min(pattern, mirror_pattern(pattern))


def pattern_bits(pattern: int) -> np.ndarray:
    """The 9 cells (row-major, row 0 at the top) as a 0/1 array."""
    return np.array([(pattern >> k) & 1 for k in range(PATTERN_BITS)], dtype=np.uint8)


CANONICAL_PATTERNS = tuple(sorted({canonical_pattern(p) for p in range(2**PATTERN_BITS)}))
# One sixth of the flip classes, chosen by a fixed permutation: never used in training.
HELD_OUT_PATTERNS = frozenset(
    CANONICAL_PATTERNS[i]
    for i in np.random.default_rng(20250116).permutation(len(CANONICAL_PATTERNS))[
        : len(CANONICAL_PATTERNS) // 6
    ]
)


@dataclass(frozen=True, order=True)
class Identity:
    """One subject: captioned attributes plus the canonical (flip-invariant) pattern."""

    shape: str
    colour: str
    pattern: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS:
            raise ValueError(f"unknown shape/colour {self.shape!r}/{self.colour!r}")
        if self.pattern != canonical_pattern(self.pattern):
            raise ValueError(f"pattern {self.pattern} is not canonical")

    @property
    def held_out(self) -> bool:
        return self.pattern in HELD_OUT_PATTERNS

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.shape}-{self.pattern:03d}"

    @classmethod
    def from_name(cls, name: str) -> "Identity":
        colour, shape, pattern = name.split("-")
        return cls(shape, colour, int(pattern))


def identities(split: Split) -> tuple[Identity, ...]:
    """All identities of a split, sorted."""
    held_out = split == "held_out"
    return tuple(
        Identity(shape, colour, pattern)
        for shape in SHAPES
        for colour in COLOURS
        for pattern in CANONICAL_PATTERNS
        if (pattern in HELD_OUT_PATTERNS) == held_out
    )


def distractors(identity: Identity, k: int, rng: np.random.Generator) -> list[Identity]:
    """k other identities of the same split sharing the captioned attributes."""
    pool = [
        p for p in CANONICAL_PATTERNS
        if p != identity.pattern and (p in HELD_OUT_PATTERNS) == identity.held_out
    ]
    chosen = rng.choice(len(pool), size=k, replace=False)
    return [Identity(identity.shape, identity.colour, pool[i]) for i in chosen]


# --------------------------------------------------------------------------- shapes


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, rotation: float) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        angle = rotation + 2 * math.pi * (k + 0.5) / sides
        inside &= u * math.cos(angle) + v * math.sin(angle) <= math.cos(math.pi / sides)
    return inside


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = u * 1.15, -(v * 1.15 - 0.15)
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


# Each takes local coordinates in [-1, 1] (v pointing down) and returns the body mask.
_SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "hexagon": lambda u, v: _regular_polygon(u, v, 6, -math.pi / 6),
    "heart": _heart,
    "cross": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 1.0)
    & ((np.abs(u) <= 0.45) | (np.abs(v) <= 0.45)),
}


def palette(colour: str) -> np.ndarray:
    """Body, light-cell and dark-cell RGB of a colour, shape (3, 3) uint8."""
    base = np.array(_RGB[colour], dtype=np.float32)
    light = base + _LIGHT * (255 - base)
    dark = base * _DARK
    return np.stack([base, light, dark]).round().astype(np.uint8)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Placement:
    """Where and how one subject appears: centre and size in pixels, angle in degrees."""

    identity: Identity
    cx: float
    cy: float
    size: float
    angle: float = 0.0
    flipped: bool = False

    @property
    def position(self) -> str:
        return POSITIONS[min(int(self.cx * 3 // IMAGE_SIZE), 2)]

    @property
    def image_pattern(self) -> int:
        """The pattern as it reads in the image (mirrored when the subject is flipped)."""
        return mirror_pattern(self.identity.pattern) if self.flipped else self.identity.pattern

    def body_frame(self, x: np.ndarray, y: np.ndarray, unflip: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (broadcastable arrays) in the subject's own frame, in half-sizes
        from its centre: the rotation undone, and the flip too unless `unflip` is False
        (the image's handedness, all that a symmetric shape shows of its pose)."""
        dx, dy = (x - self.cx) / (self.size / 2), (y - self.cy) / (self.size / 2)
        cos, sin = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        return (-u if self.flipped and unflip else u), v


@dataclass(frozen=True)
class Scene:
    """A background (type, texture variant, flip, shift) and subjects listed left to right."""

    background: str
    variant: int
    background_flipped: bool
    background_shift: int
    placements: tuple[Placement, ...]

    @property
    def caption(self) -> str:
        """Position-first caption naming every subject's attributes, then the background."""
        parts = [f"{POSITION_PHRASES[p.position]}, {p.identity.phrase}" for p in self.placements]
        return "; ".join(parts + [f"{self.background} background"])


@dataclass
class Render:
    """A rendered scene: RGB uint8 image (H, W, 3) and boolean instance masks (N, H, W)."""

    image: np.ndarray
    masks: np.ndarray
    scene: Scene

    @property
    def caption(self) -> str:
        return self.scene.caption


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1]: cheap blotchy texture."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, IMAGE_SIZE, endpoint=False)
    i, f = t.astype(int), (t % 1)[:, None]
    rows = grid[i] * (1 - f) + grid[i + 1] * f
    return rows[:, i] * (1 - f.T) + rows[:, i + 1] * f.T


def _fill(colour: Sequence[float]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.float32), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def _beach(rng: np.random.Generator) -> np.ndarray:
    img = _fill((215, 195, 150))
    y = np.arange(IMAGE_SIZE)[:, None]
    x = np.arange(IMAGE_SIZE)[None, :]
    horizon = 18 + rng.integers(0, 8) + 2 * np.sin(x / 7 + rng.random() * 6)
    shore = horizon + 7 + 2 * np.sin(x / 5 + rng.random() * 6)
    img[np.broadcast_to(y < shore, (IMAGE_SIZE, IMAGE_SIZE))] = (75, 130, 170)
    img[np.broadcast_to(y < horizon, (IMAGE_SIZE, IMAGE_SIZE))] = (160, 200, 230)
    return img + 14 * (_smooth_noise(rng, 16)[..., None] - 0.5)


def _forest(rng: np.random.Generator) -> np.ndarray:
    img = _fill((70, 95, 65)) + 30 * (_smooth_noise(rng, 10)[..., None] - 0.5)
    for x in rng.integers(0, IMAGE_SIZE, 6):
        img[:, x : x + rng.integers(2, 4)] = (85, 65, 50)
    return img


def _speckled(
    rng: np.random.Generator, colour: tuple, noise: float, cells: int, specks: int, speck_colour: tuple
) -> np.ndarray:
    """A blotchy plain colour sprinkled with single-pixel specks (snowflakes, stars)."""
    img = _fill(colour) + noise * (_smooth_noise(rng, cells)[..., None] - 0.5)
    ys, xs = rng.integers(0, IMAGE_SIZE, (2, specks))
    img[ys, xs] = speck_colour
    return img


def _snow(rng: np.random.Generator) -> np.ndarray:
    return _speckled(rng, (228, 232, 238), 10, 8, 60, (185, 195, 210))


def _city(rng: np.random.Generator) -> np.ndarray:
    img = _fill((175, 180, 190))
    x = 0
    while x < IMAGE_SIZE:
        width, top = rng.integers(8, 16), rng.integers(8, 30)
        shade = rng.integers(95, 135)
        img[top:, x : x + width] = (shade, shade, shade + 5)
        img[top + 3 :: 5, x + 2 : x + width - 2 : 3] = (205, 200, 160)
        x += width + 1
    return img


def _night(rng: np.random.Generator) -> np.ndarray:
    return _speckled(rng, (22, 26, 58), 12, 6, 25, (230, 230, 210))


def _desert(rng: np.random.Generator) -> np.ndarray:
    y = np.arange(IMAGE_SIZE)[:, None, None]
    x = np.arange(IMAGE_SIZE)[None, :, None]
    dunes = np.sin(y / 3.0 + 2 * np.sin(x / 11 + rng.random() * 6))
    img = _fill((205, 170, 110)) + 12 * dunes
    sky = int(rng.integers(6, 14))
    img[:sky] = (222, 205, 170)
    return img


_BACKGROUND_PAINTERS = {
    "beach": _beach, "forest": _forest, "snow": _snow,
    "city": _city, "night": _night, "desert": _desert,
}


class MiniWorld:
    """Samples and renders scenes; `seed` fixes the background textures.

    All sampling takes an explicit `numpy.random.Generator`, so any sample is a pure
    function of (world seed, sample seed).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        rng = np.random.default_rng([seed, 7])
        self._textures = {
            name: np.stack(
                [np.clip(paint(rng), 0, 255).round().astype(np.uint8) for _ in range(_TEXTURE_VARIANTS)]
            )
            for name, paint in _BACKGROUND_PAINTERS.items()
        }
        self._identities = {split: identities(split) for split in ("train", "held_out")}

    # ---------------------------------------------------------------- sampling

    def sample_identity(self, rng: np.random.Generator, split: Split = "train") -> Identity:
        pool = self._identities[split]
        return pool[rng.integers(len(pool))]

    def sample_identities(
        self, rng: np.random.Generator, count: int, split: Split = "train", twin_prob: float = 0.0
    ) -> list[Identity]:
        """`count` distinct identities; with probability `twin_prob` two of them share
        shape and colour (they differ only in the pattern)."""
        chosen = [self.sample_identity(rng, split)]
        if count >= 2 and rng.random() < twin_prob:
            chosen += distractors(chosen[0], 1, rng)
        while len(chosen) < count:
            candidate = self.sample_identity(rng, split)
            if candidate not in chosen:
                chosen.append(candidate)
        return [chosen[i] for i in rng.permutation(count)]

    def sample_scene(
        self,
        rng: np.random.Generator,
        subjects: Sequence[Identity],
        background: str | None = None,
        positions: Sequence[str] | None = None,
        sizes_of: int | None = None,
    ) -> Scene:
        """A scene with `subjects` placed left to right at random sizes, angles and flips.

        One subject goes to a random third (or `positions[0]`); two go left and right;
        three go left, middle and right. Subjects take the sizes of a scene of their own
        count, or of `sizes_of` subjects (a lone subject drawn as small as in a pair).
        """
        count = len(subjects)
        if not 1 <= count <= MAX_SUBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_SUBJECTS} subjects, got {count}")
        slots = tuple(positions) if positions is not None else _SLOTS[count]
        if slots is None:
            slots = (POSITIONS[rng.integers(3)],)
        if len(slots) != count:
            raise ValueError(f"{count} subjects need {count} positions, got {slots}")
        sizes_of = count if sizes_of is None else sizes_of
        if sizes_of not in _SIZE_RANGE:
            raise ValueError(f"sizes_of must be a subject count in {sorted(_SIZE_RANGE)}, got {sizes_of}")
        placements = self._place(rng, subjects, slots, _SIZE_RANGE[sizes_of])
        if background is None:
            background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        return Scene(
            background=background,
            variant=int(rng.integers(_TEXTURE_VARIANTS)),
            background_flipped=bool(rng.random() < 0.5),
            background_shift=int(rng.integers(IMAGE_SIZE)),
            placements=placements,
        )

    def _place(
        self, rng: np.random.Generator, subjects: Sequence[Identity], slots: Sequence[str],
        size_range: tuple[float, float],
    ) -> tuple[Placement, ...]:
        """Rejection-sample centres inside each slot's third with no overlaps."""
        low, high = size_range
        third = IMAGE_SIZE / 3
        for _ in range(200):
            boxes, placements = [], []
            for identity, slot in zip(subjects, slots):
                size = float(rng.uniform(low, high))
                half = _EXTENT * size / 2
                index = POSITIONS.index(slot)
                x_lo = max(index * third + 1.0, half + 1.0)
                x_hi = min((index + 1) * third - 1.0, IMAGE_SIZE - half - 1.0)
                if x_lo > x_hi:
                    break
                cx = float(rng.uniform(x_lo, x_hi))
                cy = float(rng.uniform(half + 1.0, IMAGE_SIZE - half - 1.0))
                box = (cx - half - _GAP / 2, cy - half - _GAP / 2, cx + half + _GAP / 2, cy + half + _GAP / 2)
                if any(_overlap(box, other) for other in boxes):
                    break
                boxes.append(box)
                angle = float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE))
                placements.append(Placement(identity, cx, cy, size, angle, bool(rng.random() < 0.5)))
            else:
                return tuple(sorted(placements, key=lambda p: p.cx))
        raise RuntimeError(f"could not place {len(subjects)} subjects in slots {slots}")

    # ---------------------------------------------------------------- rendering

    def background(self, scene: Scene) -> np.ndarray:
        """The scene's background alone, (H, W, 3) uint8."""
        image = self._textures[scene.background][scene.variant]
        if scene.background_flipped:
            image = image[:, ::-1]
        return np.roll(image, scene.background_shift, axis=1)

    def render(self, scene: Scene) -> Render:
        image = self.background(scene).copy()
        masks = np.zeros((len(scene.placements), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for mask, placement in zip(masks, scene.placements):
            _draw_subject(image, mask, placement)
        return Render(image=image, masks=masks, scene=scene)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw_subject(image: np.ndarray, mask: np.ndarray, p: Placement) -> None:
    """Paint one subject into `image` and mark its pixels in `mask`, in place."""
    reach = int(math.ceil(_EXTENT * p.size / 2)) + 1
    x0, x1 = max(int(p.cx) - reach, 0), min(int(p.cx) + reach + 1, IMAGE_SIZE)
    y0, y1 = max(int(p.cy) - reach, 0), min(int(p.cy) + reach + 1, IMAGE_SIZE)
    u, v = p.body_frame((np.arange(x0, x1) + 0.5)[None, :], (np.arange(y0, y1) + 0.5)[:, None])
    shape, colour, pattern = p.identity.shape, p.identity.colour, p.identity.pattern
    body = _SHAPE_TESTS[shape](u, v)
    cell = 2 * _GRID_HALF / 3
    col = np.floor((u + _GRID_HALF) / cell).astype(int)
    row = np.floor((v - _GRID_CENTRE_V.get(shape, 0.0) + _GRID_HALF) / cell).astype(int)
    in_grid = (col >= 0) & (col < 3) & (row >= 0) & (row < 3)
    bit = (pattern >> np.clip(row * 3 + col, 0, 8)) & 1
    tone = np.where(in_grid, 2 - bit, 0)  # 0 body, 1 light cell, 2 dark cell
    image[y0:y1, x0:x1][body] = palette(colour)[tone[body]]
    mask[y0:y1, x0:x1] |= body


# --------------------------------------------------------------------------- datasets


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class WorldDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item i is a pure function of (world seed, seed, split, i).

    Random access by index makes resuming trivial: a run at step s with batch b just
    continues from index s * b.
    """

    stream = 0

    def __init__(self, world: MiniWorld, split: Split = "train", seed: int = 0, length: int = 10**9):
        self.world, self.split, self.seed, self.length = world, split, seed, length

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, int(self.split == "held_out"), index])

    def __getitem__(self, index: int) -> dict:
        return self.sample(self.rng(index))

    def sample(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError


LONE_SIZES = (1.0, 0.0, 0.0)


def check_target_sizes(probs: Sequence[float]) -> tuple[float, ...]:
    """Validate `PairDataset.target_sizes`: one probability per subject count, summing to 1."""
    probs = tuple(float(p) for p in probs)
    if len(probs) != MAX_SUBJECTS or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"target_sizes needs {MAX_SUBJECTS} non-negative probabilities (1-, 2-, 3-subject sizes) "
                         f"summing to 1, got {probs}")
    return probs


def _names(scene: Scene) -> str:
    """Identity names of a scene's subjects, left to right, joined by '|' (collatable)."""
    return "|".join(p.identity.name for p in scene.placements)


class TextToImageDataset(WorldDataset):
    """Base-model data: 1-3 subjects, a caption, and the union of the subject masks."""

    stream = 1
    count_probs = (0.5, 0.35, 0.15)

    def sample(self, rng: np.random.Generator) -> dict:
        count = int(rng.choice(3, p=self.count_probs)) + 1
        subjects = self.world.sample_identities(rng, count, self.split, twin_prob=0.3)
        render = self.world.render(self.world.sample_scene(rng, subjects))
        return {
            "image": to_tensor(render.image),
            "mask": torch.from_numpy(render.masks.any(0, keepdims=True)).float(),
            "caption": render.caption,
            "identities": _names(render.scene),
        }


class PairDataset(WorldDataset):
    """Stage-1 pairs: one identity in two independent contexts (reference, target).

    `target_sizes`: probabilities that the target shows its subject at the sizes of a 1-,
    2- or 3-subject scene. The default (lone-subject sizes only) is the shipped set's data;
    smaller targets teach the encoder to copy at the sizes that pairs and trios are drawn
    at, instead of drawing every subject as large as a lone one.
    """

    stream = 2

    def __init__(self, world: MiniWorld, split: Split = "train", seed: int = 0, length: int = 10**9,
                 target_sizes: Sequence[float] = LONE_SIZES):
        super().__init__(world, split, seed, length)
        self.target_sizes = check_target_sizes(target_sizes)

    def sample(self, rng: np.random.Generator) -> dict:
        identity = self.world.sample_identity(rng, self.split)
        reference = self.world.render(self.world.sample_scene(rng, [identity]))
        sizes_of = 1  # drawn only when asked, so that the default keeps the shipped set's samples
        if self.target_sizes != LONE_SIZES:
            sizes_of = int(rng.choice(MAX_SUBJECTS, p=self.target_sizes)) + 1
        target = self.world.render(self.world.sample_scene(rng, [identity], sizes_of=sizes_of))
        return {
            "reference": to_tensor(reference.image),
            "reference_mask": torch.from_numpy(reference.masks).float(),
            "image": to_tensor(target.image),
            "mask": torch.from_numpy(target.masks).float(),
            "caption": target.caption,
            "identities": identity.name,
        }


class SceneDataset(WorldDataset):
    """Stage-2 scenes: 2-3 subjects (half the scenes hold a same-shape-and-colour pair),
    instance masks padded to `MAX_SUBJECTS` with `num_subjects` telling how many are real."""

    stream = 3
    twin_prob = 0.5
    min_subjects = 2  # the paper's stage 2 is multi-subject; 1 was tried (docs/mini-world-training.md)

    def sample(self, rng: np.random.Generator) -> dict:
        count = int(rng.integers(self.min_subjects, MAX_SUBJECTS + 1))
        subjects = self.world.sample_identities(rng, count, self.split, self.twin_prob)
        render = self.world.render(self.world.sample_scene(rng, subjects))
        return {
            "image": to_tensor(render.image),
            "masks": _padded(render.masks),
            "num_subjects": count,
            "caption": render.caption,
            "identities": _names(render.scene),
        }


class ScenePairDataset(WorldDataset):
    """Stage-1 pairs of whole scenes: a target of 1-3 subjects (two- and three-subject
    scenes hold twins half the time) and, per subject, a reference of it alone in a context
    of its own, listed left to right as the target's masks and padded to `MAX_SUBJECTS`
    (the data of stage 1's `layout_routing` deviation: copying beside other subjects)."""

    stream = 4
    count_probs = (0.4, 0.4, 0.2)
    twin_prob = 0.5

    def sample(self, rng: np.random.Generator) -> dict:
        count = int(rng.choice(MAX_SUBJECTS, p=self.count_probs)) + 1
        subjects = self.world.sample_identities(rng, count, self.split, self.twin_prob)
        target = self.world.render(self.world.sample_scene(rng, subjects))
        alone = [self.world.render(self.world.sample_scene(rng, [p.identity])) for p in target.scene.placements]
        references = np.zeros((MAX_SUBJECTS, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        references[:count] = [r.image for r in alone]
        return {
            "image": to_tensor(target.image),
            "masks": _padded(target.masks),
            "references": torch.stack([to_tensor(image) for image in references]),
            "reference_masks": _padded(np.stack([r.masks[0] for r in alone])),
            "num_subjects": count,
            "caption": target.caption,
            "identities": _names(target.scene),
        }


def _padded(masks: np.ndarray) -> torch.Tensor:
    """(k, H, W) bool masks -> (MAX_SUBJECTS, H, W) float, zero masks after the k real ones."""
    padded = np.zeros((MAX_SUBJECTS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    padded[: len(masks)] = masks
    return torch.from_numpy(padded)
