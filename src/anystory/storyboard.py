"""Storyboard scripts: a cast of characters, an optional style and a list of frames.

A story is told by generating every frame with the characters acting in it. Each
character is either given by a reference image (plus an optional mask) or created first
from a prompt; it is encoded once per story and reused by every frame.

Two script formats are read and mapped to the same `Storyboard`, the format is detected
from the content:

**AnyStory scripts** (YAML or JSON)::

    title: The lighthouse keeper          # optional
    style: "watercolor illustration of {}, soft light"  # optional; "{}" is the prompt,
                                          # without "{}" the style is appended
    seed: 0                               # optional, default seed of every frame
    characters:
      - alias: Max                        # the word that names the character in prompts
        image: refs/max.png               # relative paths: against the script's folder
        mask: refs/max_mask.png           # optional (RGBA alpha or matting otherwise)
        description: a corgi dog          # optional: words that replace the alias
      - alias: Ada
        prompt: an old woman in a red raincoat   # no image: created from this prompt
    frames:
      - prompt: Max runs along the beach at dawn
      - prompt: Ada walks Max along the pier
        characters: [Ada, Max]            # optional: acting characters beyond the
        seed: 7                           # aliases the prompt names; optional seed
        narration: They meet at the pier. # optional caption

The acting characters of a frame are those it lists plus every alias its prompt names
(whole words, case-sensitive). In the generated prompt each alias is replaced by the
character's description; a created character's description defaults to its prompt.

**Official AnyStory (FLUX) release scripts** (JSON, Chinese keys) are loaded as they
are: `角色表` (character table: `alias`, `simple_prompt`, `角色名` name) becomes the
characters, created from `simple_prompt`; `分镜头` (shots: `序号` index, `prompt`,
`act_roles`, `旁白` narration) becomes the frames; `故事梗概` (synopsis) the title. As in
the official release, aliases in a shot's prompt are replaced by the character's
`simple_prompt`, and its acting characters are `act_roles` plus the aliases it names.
SDXL's text encoders read 77 tokens, so keep descriptions short: long official prompts
are truncated.

`run_storyboard(pipe, storyboard, out_dir)` generates the story: characters are created
(and segmented) if needed, encoded once, and every frame selects its cast.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .matting import MattingBackend, extract_mask, matted_subject
from .subject import Subject

OFFICIAL_CHARACTERS, OFFICIAL_SHOTS, OFFICIAL_SYNOPSIS = "角色表", "分镜头", "故事梗概"
OFFICIAL_NAME, OFFICIAL_INDEX, OFFICIAL_NARRATION = "角色名", "序号", "旁白"


class StoryboardError(ValueError):
    """A storyboard script that cannot be used, with the reason."""


@dataclass(frozen=True)
class Character:
    """One member of the cast: a reference image (and optional mask) or a creation prompt."""

    alias: str
    image: Path | None = None
    mask: Path | None = None
    prompt: str | None = None
    description: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.alias, str) or not self.alias.strip() or self.alias != self.alias.strip():
            raise StoryboardError(f"character alias must be a non-empty word, got {self.alias!r}")
        if (self.image is None) == (self.prompt is None):
            raise StoryboardError(
                f"character {self.alias!r} needs either an `image` or a `prompt` to create it from"
                + (" (not both)" if self.image is not None else "")
            )
        if self.mask is not None and self.image is None:
            raise StoryboardError(f"character {self.alias!r} has a `mask` but no `image`")
        for kind in ("image", "mask"):
            path = getattr(self, kind)
            if path is not None:
                object.__setattr__(self, kind, Path(path))
                if not Path(path).is_file():
                    raise StoryboardError(f"character {self.alias!r}: {kind} file not found: {path}")
        if self.prompt is not None and not self.prompt.strip():
            raise StoryboardError(f"character {self.alias!r} has an empty `prompt`")

    @property
    def needs_creation(self) -> bool:
        """True when the character has no reference image and must be generated first."""
        return self.image is None

    @property
    def text(self) -> str:
        """The words that stand for the character in frame prompts."""
        if self.description:
            return self.description
        return self.prompt.strip().rstrip(".").strip() if self.prompt else self.alias


@dataclass(frozen=True)
class Frame:
    """One picture of the story: a prompt naming its characters by alias. Frames without
    an index are numbered by their position in the story, from 1."""

    prompt: str
    characters: tuple[str, ...] = ()
    seed: int | None = None
    index: int | None = None
    narration: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise StoryboardError(f"frame {self.index} has an empty prompt")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise StoryboardError(f"frame {self.index}: seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class Storyboard:
    """A validated story: characters, frames, an optional style, a default seed."""

    characters: tuple[Character, ...]
    frames: tuple[Frame, ...]
    style: str | None = None
    title: str | None = None
    seed: int = 0
    _alias_pattern: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.frames:
            raise StoryboardError("the storyboard has no frames")
        numbered = tuple(f if f.index is not None else replace(f, index=i + 1) for i, f in enumerate(self.frames))
        object.__setattr__(self, "frames", numbered)
        aliases = [c.alias for c in self.characters]
        duplicates = sorted({a for a in aliases if aliases.count(a) > 1})
        if duplicates:
            raise StoryboardError(f"duplicate character alias: {', '.join(duplicates)}")
        indices = [f.index for f in self.frames]
        if len(set(indices)) != len(indices):
            raise StoryboardError(f"duplicate frame index: {sorted({i for i in indices if indices.count(i) > 1})}")
        for frame in self.frames:
            unknown = [a for a in frame.characters if a not in aliases]
            if unknown:
                raise StoryboardError(
                    f"frame {frame.index} names unknown character(s) {unknown}; "
                    f"known aliases: {aliases}"
                )
        if aliases:
            alternation = "|".join(re.escape(a) for a in sorted(aliases, key=len, reverse=True))
            object.__setattr__(self, "_alias_pattern", re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])"))

    @classmethod
    def load(cls, path: str | Path) -> Storyboard:
        """Read a script (AnyStory YAML/JSON or an official AnyStory release script)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise StoryboardError(f"cannot read storyboard script {path}: {error}") from error
        is_json = path.suffix.lower() == ".json"
        try:
            data = json.loads(text) if is_json else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise StoryboardError(f"{path} is not valid {'JSON' if is_json else 'YAML'}: {error}") from error
        try:
            if is_official_script(data):
                return cls.from_official(data)
            return cls.from_dict(data, base_dir=path.parent)
        except StoryboardError as error:
            raise StoryboardError(f"{path}: {error}") from None

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path = ".") -> Storyboard:
        """Build from an AnyStory script's content; relative paths resolve against `base_dir`."""
        data = _mapping(data, "the script", ("title", "style", "seed", "characters", "frames"))
        base_dir = Path(base_dir)
        characters = tuple(
            _character(_mapping(item, f"character #{i + 1}", _CHARACTER_KEYS), base_dir)
            for i, item in enumerate(_sequence(data.get("characters", []), "characters"))
        )
        frames = tuple(
            _frame(_mapping(item, f"frame #{i + 1}", _FRAME_KEYS), index=i + 1)
            for i, item in enumerate(_sequence(data.get("frames"), "frames"))
        )
        return cls(
            characters=characters,
            frames=frames,
            style=_optional_str(data, "style", "the script"),
            title=_optional_str(data, "title", "the script"),
            seed=_seed(data.get("seed", 0), "the script"),
        )

    @classmethod
    def from_official(cls, data: Mapping[str, Any]) -> Storyboard:
        """Map an official AnyStory (FLUX) release script to a storyboard."""
        characters = []
        for i, item in enumerate(_sequence(data.get(OFFICIAL_CHARACTERS, []), OFFICIAL_CHARACTERS)):
            item = _mapping(item, f"{OFFICIAL_CHARACTERS} #{i + 1}")
            characters.append(
                Character(
                    alias=_required_str(item, "alias", f"{OFFICIAL_CHARACTERS} #{i + 1}").strip(),
                    prompt=_required_str(item, "simple_prompt", f"{OFFICIAL_CHARACTERS} #{i + 1}"),
                    name=item.get(OFFICIAL_NAME),
                )
            )
        frames = []
        for i, item in enumerate(_sequence(data.get(OFFICIAL_SHOTS), OFFICIAL_SHOTS)):
            where = f"{OFFICIAL_SHOTS} #{i + 1}"
            item = _mapping(item, where)
            index = item.get(OFFICIAL_INDEX, i + 1)
            if isinstance(index, bool) or not isinstance(index, int):
                raise StoryboardError(f"{where}: {OFFICIAL_INDEX} must be an integer, got {index!r}")
            frames.append(
                Frame(
                    prompt=_required_str(item, "prompt", where).strip(),
                    characters=tuple(_str_list(item.get("act_roles", []), f"{where} act_roles")),
                    index=index,
                    narration=item.get(OFFICIAL_NARRATION),
                )
            )
        return cls(characters=tuple(characters), frames=tuple(frames), title=data.get(OFFICIAL_SYNOPSIS))

    def with_references(self, references: Mapping[str, tuple[str | Path, str | Path | None]]) -> Storyboard:
        """Give characters reference images (alias -> (image, mask or None)) instead of prompts.

        The characters keep the words that describe them in frame prompts.
        """
        for alias in references:
            self.character(alias)
        characters = tuple(
            replace(c, image=references[c.alias][0], mask=references[c.alias][1], prompt=None, description=c.text)
            if c.alias in references
            else c
            for c in self.characters
        )
        return replace(self, characters=characters)

    def character(self, alias: str) -> Character:
        """The character with this alias."""
        for character in self.characters:
            if character.alias == alias:
                return character
        raise StoryboardError(f"unknown character {alias!r}; known aliases: {[c.alias for c in self.characters]}")

    def mentioned(self, text: str) -> list[str]:
        """Aliases named in `text` (whole words), in order of first appearance."""
        if self._alias_pattern is None:
            return []
        return list(dict.fromkeys(match.group(0) for match in self._alias_pattern.finditer(text)))

    def acting(self, frame: Frame) -> tuple[str, ...]:
        """The frame's acting characters: those it lists, then those its prompt names."""
        return tuple(dict.fromkeys([*frame.characters, *self.mentioned(frame.prompt)]))

    def frame_prompt(self, frame: Frame) -> str:
        """The text prompt of a frame: aliases replaced by their descriptions, style applied."""
        if self._alias_pattern is None:
            return self.apply_style(frame.prompt)
        texts = {c.alias: c.text for c in self.characters}
        return self.apply_style(self._alias_pattern.sub(lambda m: texts[m.group(0)], frame.prompt))

    def character_prompt(self, character: Character) -> str:
        """The prompt that creates a character without a reference image, style applied."""
        if character.prompt is None:
            raise StoryboardError(f"character {character.alias!r} has a reference image, no prompt")
        return self.apply_style(character.prompt.strip())

    def frame_seed(self, frame: Frame) -> int:
        """The frame's own seed, else the story's."""
        return self.seed if frame.seed is None else frame.seed

    def apply_style(self, prompt: str) -> str:
        """Put `prompt` into the style: at its "{}" if it has one, else before it."""
        if not self.style:
            return prompt
        if "{}" in self.style:
            return self.style.replace("{}", prompt)
        return f"{prompt}, {self.style}"


def is_official_script(data: Any) -> bool:
    """True for a script in the official AnyStory (FLUX) release's format."""
    return isinstance(data, Mapping) and (OFFICIAL_CHARACTERS in data or OFFICIAL_SHOTS in data)


_CHARACTER_KEYS = ("alias", "image", "mask", "prompt", "description", "name")
_FRAME_KEYS = ("prompt", "characters", "seed", "narration")


def _character(item: Mapping[str, Any], base_dir: Path) -> Character:
    where = f"character {item.get('alias')!r}"

    def path(key: str) -> Path | None:
        value = _optional_str(item, key, where)
        return None if value is None else (base_dir / Path(value).expanduser()).resolve()

    return Character(
        alias=_required_str(item, "alias", where),
        image=path("image"),
        mask=path("mask"),
        prompt=_optional_str(item, "prompt", where),
        description=_optional_str(item, "description", where),
        name=_optional_str(item, "name", where),
    )


def _frame(item: Mapping[str, Any], index: int) -> Frame:
    where = f"frame {index}"
    seed = item.get("seed")
    return Frame(
        prompt=_required_str(item, "prompt", where),
        characters=tuple(_str_list(item.get("characters", []), f"{where} characters")),
        seed=None if seed is None else _seed(seed, where),
        index=index,
        narration=_optional_str(item, "narration", where),
    )


def _mapping(value: Any, where: str, allowed: Sequence[str] | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StoryboardError(f"{where} must be a mapping of keys to values, got {type(value).__name__}")
    if allowed is not None:
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise StoryboardError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    return value


def _sequence(value: Any, where: str) -> list[Any]:
    if value is None:
        raise StoryboardError(f"the script has no {where}")
    if not isinstance(value, list):
        raise StoryboardError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StoryboardError(f"{where} must be a list of aliases, got {value!r}")
    return [v.strip() for v in value]


def _required_str(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise StoryboardError(f"{where}: `{key}` must be a non-empty string, got {value!r}")
    return value


def _optional_str(item: Mapping[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise StoryboardError(f"{where}: `{key}` must be a string, got {value!r}")
    return value


def _seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoryboardError(f"{where}: seed must be an integer, got {value!r}")
    return value


def contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    columns: int | None = None,
    font_size: int | None = None,
    padding: int = 8,
    max_caption_lines: int = 4,
    min_tile: int = 256,
) -> Image.Image:
    """Lay images out on a grid, each with its caption underneath, to see a story at once.

    Tiles take the size of the largest image (smaller ones are centred); images smaller
    than `min_tile` are enlarged by a whole factor (nearest neighbour, so pixels stay
    sharp) so that small renders stay readable. Captions are wrapped to the tile width
    and cut after `max_caption_lines` lines. The font size defaults to a fortieth of the
    tile width (at least 12 px).
    """
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"contact_sheet got {len(images)} images but {len(captions)} captions")
    factor = max(1, min_tile // max(max(image.size) for image in images))
    images = [image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) for image in images]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tile_w = max(image.width for image in images)
    tile_h = max(image.height for image in images)
    font_size = font_size or max(12, tile_w // 40)
    font = ImageFont.load_default(size=font_size)
    wrapped = [_wrap(caption, font, tile_w, max_caption_lines) for caption in captions]
    line_h = font_size + 4
    caption_h = max(len(lines) for lines in wrapped) * line_h
    cell_w, cell_h = tile_w + padding, tile_h + caption_h + 2 * padding
    sheet = Image.new("RGB", (columns * cell_w + padding, rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x0 = padding + (i % columns) * cell_w
        y0 = padding + (i // columns) * cell_h
        sheet.paste(image.convert("RGB"), (x0 + (tile_w - image.width) // 2, y0 + (tile_h - image.height) // 2))
        for j, line in enumerate(lines):
            draw.text((x0, y0 + tile_h + padding // 2 + j * line_h), line, fill="black", font=font)
    return sheet


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap measured in pixels; the last kept line ends with an ellipsis if cut."""
    average = max(font.getlength("x"), 1.0)
    chars = max(int(width / average), 1)
    lines = textwrap.wrap(" ".join(text.split()), width=chars) or [""]
    while chars > 1 and any(font.getlength(line) > width for line in lines):
        chars -= 1
        lines = textwrap.wrap(" ".join(text.split()), width=chars)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(len(lines[-1]) - 1, 0)] + "…"
    return lines


@dataclass
class StoryResult:
    """A generated story: frames by index, the cast as encoded, and the contact sheet."""

    frames: dict[int, Image.Image]
    characters: dict[str, Subject]
    contact_sheet: Image.Image


def run_storyboard(
    pipe,
    storyboard: Storyboard,
    out_dir: str | Path,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 1,
    matting: str | Path | MattingBackend | None = None,
    progress: bool = True,
    **pipe_kwargs,
) -> StoryResult:
    """Generate every frame of a story with an `AnyStorySDXLPipeline`.

    Characters without a reference image are first generated from their prompt and
    segmented (`matting`: see `anystory.matting`); they are cached in
    `out_dir/characters`, so a re-run reuses them. Every character is encoded once and
    each frame selects its cast from these encodings. Consecutive frames with the same
    cast are generated `batch_size` at a time, each with its own seed. Writes
    `out_dir/frames/<index>.png` and `out_dir/contact_sheet.png`.
    `pipe_kwargs` (height, width, subject_scale, reference_shift, use_router, ...) go to
    every pipeline call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    settings = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **pipe_kwargs)
    cast = {
        c.alias: _cast_member(pipe, storyboard, c, out_dir / "characters", matting, settings)
        for c in tqdm(storyboard.characters, desc="characters", disable=not progress)
    }
    aliases = list(cast)
    encodings = pipe.encode_subjects(list(cast.values())) if cast else None
    (out_dir / "frames").mkdir(parents=True, exist_ok=True)
    frames: dict[int, Image.Image] = {}
    for group in tqdm(_batches(storyboard, batch_size), desc="frames", disable=not progress):
        acting = storyboard.acting(group[0])
        subjects = encodings.select([aliases.index(a) for a in acting]) if acting else None
        images = pipe(
            prompt=[storyboard.frame_prompt(f) for f in group],
            subjects=subjects,
            generator=[torch.Generator().manual_seed(storyboard.frame_seed(f)) for f in group],
            **settings,
        ).images
        for frame, image in zip(group, images):
            image.save(out_dir / "frames" / f"{frame.index:03d}.png")
            frames[frame.index] = image
    sheet = contact_sheet(
        [frames[f.index] for f in storyboard.frames],
        [f"{f.index}. {f.prompt}" for f in storyboard.frames],
    )
    sheet.save(out_dir / "contact_sheet.png")
    return StoryResult(frames=frames, characters=cast, contact_sheet=sheet)


def _batches(storyboard: Storyboard, batch_size: int) -> list[list[Frame]]:
    """Consecutive frames with the same cast, at most `batch_size` together."""
    batches: list[list[Frame]] = []
    for frame in storyboard.frames:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and storyboard.acting(last[0]) == storyboard.acting(frame):
            last.append(frame)
        else:
            batches.append([frame])
    return batches


def _cast_member(pipe, storyboard: Storyboard, character: Character, cache: Path, matting, settings: dict) -> Subject:
    """The character as a `Subject`: its reference (masked), or created once and cached as
    an RGBA cut-out whose alpha is the mask."""
    if not character.needs_creation:
        return matted_subject(character.image, character.mask, backend=matting, name=character.alias)
    prompt = storyboard.character_prompt(character)
    key = hashlib.sha1(repr((prompt, storyboard.seed, sorted(settings.items()))).encode()).hexdigest()[:10]
    path = cache / (re.sub(r"[^\w.-]", "_", character.alias) + f"-{key}.png")
    if not path.is_file():
        image = pipe(prompt=prompt, generator=torch.Generator().manual_seed(storyboard.seed), **settings).images[0]
        cutout = image.convert("RGBA")
        cutout.putalpha(Image.fromarray(extract_mask(image, matting).astype(np.uint8) * 255))
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")  # a killed run leaves no half-written cache
        cutout.save(partial, format="PNG")
        partial.replace(path)
    return Subject(path, name=character.alias)
