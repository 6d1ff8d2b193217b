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
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

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
            if path is None:
                continue
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
    """One picture of the story: a prompt naming its characters by alias."""

    prompt: str
    characters: tuple[str, ...] = ()
    seed: int | None = None
    index: int = 0
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
    def load(cls, path: str | Path) -> "Storyboard":
        """Read a script (AnyStory YAML/JSON or an official AnyStory release script)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise StoryboardError(f"cannot read storyboard script {path}: {error}") from error
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise StoryboardError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {error}") from error
        try:
            if is_official_script(data):
                return cls.from_official(data)
            return cls.from_dict(data, base_dir=path.parent)
        except StoryboardError as error:
            raise StoryboardError(f"{path}: {error}") from None

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path = ".") -> "Storyboard":
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
    def from_official(cls, data: Mapping[str, Any]) -> "Storyboard":
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

    def with_references(self, references: Mapping[str, tuple[str | Path, str | Path | None]]) -> "Storyboard":
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
    font_size: int = 14,
    padding: int = 8,
    max_caption_lines: int = 4,
) -> Image.Image:
    """Lay images out on a grid, each with its caption underneath, to see a story at once.

    Tiles take the size of the largest image (smaller ones are centred); captions are
    wrapped to the tile width and cut after `max_caption_lines` lines.
    """
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"contact_sheet got {len(images)} images but {len(captions)} captions")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tile_w = max(image.width for image in images)
    tile_h = max(image.height for image in images)
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
