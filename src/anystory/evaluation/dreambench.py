"""The DreamBench protocol (UNO's Table 1): DINO, CLIP-I and CLIP-T over subjects x prompts.

The dataset is read in its published layout (google/dreambooth `dataset/`): one folder
of photos per subject beside `prompts_and_classes.txt`, which holds the class table
(`subject_name,class`), 25 object prompts and 25 live-subject prompts written as
`'a {0} {1} in the jungle'.format(unique_token, class_token)`. Live subjects (the cats
and dogs; the file does not say which, the DreamBooth paper does) take the live-subject
prompts, all others the object prompts.

Single subject: 30 subjects x 25 prompts. Zero-shot methods get no unique token, so the
prompt is the template with the class word alone ("a dog in the jungle"); one reference
photo per subject is given to the generator (the first in name order unless chosen).

Multi-subject: pairs of subjects x 25 prompts, the class word replaced by both classes
("a dog and a teapot in the jungle"), the live-subject prompts when either subject is
live. DINO and CLIP-I are averaged over the subjects of the image.

Per generated image: DINO = mean cosine between its DINO embedding and those of all the
subject's real photos; CLIP-I likewise with CLIP image embeddings; CLIP-T = cosine
between its CLIP image embedding and the prompt's CLIP text embedding. The benchmark
scores are means over all generated images.
"""

from __future__ import annotations

import ast
import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .metrics import MetricModels

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"cat", "dog"})
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

Generate = Callable[[str, list[Image.Image], int], Image.Image]
"""`generate(prompt, subject_images, seed) -> image`: the method under evaluation."""


class DreamBenchError(ValueError):
    """A DreamBench folder or prompt file that cannot be used, with the reason."""


@dataclass(frozen=True)
class BenchSubject:
    """One DreamBench subject: its folder name, class word and real photos."""

    name: str
    class_name: str
    live: bool
    images: tuple[Path, ...]


@dataclass(frozen=True)
class BenchCase:
    """One prompt template applied to one subject or a group of subjects."""

    subjects: tuple[BenchSubject, ...]
    prompt_index: int
    template: str

    @property
    def key(self) -> str:
        """The subjects' names, joined: a row of the per-subject breakdown."""
        return "+".join(s.name for s in self.subjects)

    @property
    def prompt(self) -> str:
        """The zero-shot prompt: no unique token, the class words of every subject."""
        return fill_prompt(self.template, " and a ".join(s.class_name for s in self.subjects))


def fill_prompt(template: str, class_token: str, unique_token: str = "") -> str:
    """Fill a DreamBench template (`{0}` unique token, `{1}` class) and tidy the spaces."""
    return " ".join(template.format(unique_token, class_token).split())


@dataclass(frozen=True)
class PromptsAndClasses:
    """The content of `prompts_and_classes.txt`."""

    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> PromptsAndClasses:
        """Parse the file exactly: its class table and its two `prompt_list` blocks."""
        return cls(
            classes=_parse_classes(text),
            object_prompts=_parse_prompt_list(text, "Object Prompts"),
            live_prompts=_parse_prompt_list(text, "Live Subject Prompts"),
        )


def _parse_classes(text: str) -> dict[str, str]:
    header = "subject_name,class"
    start = text.find(header)
    if start < 0:
        raise DreamBenchError(f"{PROMPTS_FILE}: no class table (a `{header}` header) found")
    rows = []
    for line in text[start + len(header):].splitlines()[1:]:
        if not line.strip():
            break
        rows.append(line)
    classes = {}
    for row in csv.reader(io.StringIO("\n".join(rows))):
        if len(row) != 2 or not all(cell.strip() for cell in row):
            raise DreamBenchError(f"{PROMPTS_FILE}: bad class table row {','.join(row)!r}")
        classes[row[0].strip()] = row[1].strip()
    if not classes:
        raise DreamBenchError(f"{PROMPTS_FILE}: the class table is empty")
    return classes


def _parse_prompt_list(text: str, heading: str) -> tuple[str, ...]:
    """The templates of the `prompt_list = [...]` that follows `heading`."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
        first = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("prompt_list"))
        last = next(i for i in range(first, len(lines)) if lines[i].strip() == "]")
    except StopIteration:
        raise DreamBenchError(f"{PROMPTS_FILE}: no `prompt_list = [...]` under {heading!r}") from None
    block = "\n".join(lines[first:last + 1])
    try:
        items = ast.parse(block).body[0].value.elts
    except (SyntaxError, AttributeError, IndexError) as error:
        raise DreamBenchError(f"{PROMPTS_FILE}: cannot read the prompt list under {heading!r}: {error}") from None
    templates = []
    for item in items:
        if not (
            isinstance(item, ast.Call)
            and isinstance(item.func, ast.Attribute)
            and item.func.attr == "format"
            and isinstance(item.func.value, ast.Constant)
            and isinstance(item.func.value.value, str)
            and [getattr(a, "id", None) for a in item.args] == ["unique_token", "class_token"]
        ):
            raise DreamBenchError(
                f"{PROMPTS_FILE}: under {heading!r}, expected `'...'.format(unique_token, class_token)`, "
                f"got {ast.unparse(item)!r}"
            )
        templates.append(item.func.value.value)
    return tuple(templates)


@dataclass(frozen=True)
class DreamBench:
    """A DreamBench folder: the subjects present, their classes and the prompt templates."""

    root: Path
    subjects: tuple[BenchSubject, ...]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]
    missing: tuple[str, ...] = ()

    @classmethod
    def load(cls, root: str | Path) -> DreamBench:
        """Read the folder that holds `prompts_and_classes.txt` and the subject folders."""
        root = Path(root).expanduser()
        prompts_file = root / PROMPTS_FILE
        if not prompts_file.is_file():
            raise DreamBenchError(
                f"{root} is not a DreamBench dataset folder: no {PROMPTS_FILE} (give the folder that "
                "holds it and the subject folders, `dataset/` in google/dreambooth)"
            )
        table = PromptsAndClasses.parse(prompts_file.read_text(encoding="utf-8"))
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [p.name for p in folders if p.name not in table.classes]
        if unknown:
            raise DreamBenchError(f"subject folder(s) {unknown} in {root} have no class in {PROMPTS_FILE}")
        subjects = tuple(_subject(folder, table.classes[folder.name]) for folder in folders)
        if not subjects:
            raise DreamBenchError(f"{root} has no subject folders")
        missing = tuple(name for name in table.classes if not (root / name).is_dir())
        return cls(root, subjects, table.object_prompts, table.live_prompts, missing)

    def subject(self, name: str) -> BenchSubject:
        """The subject called `name`."""
        for subject in self.subjects:
            if subject.name == name:
                return subject
        raise DreamBenchError(f"no subject {name!r} in {self.root}; subjects: {[s.name for s in self.subjects]}")

    def templates(self, subjects: Sequence[BenchSubject]) -> tuple[str, ...]:
        """Live-subject prompts when any subject is live, object prompts otherwise."""
        return self.live_prompts if any(s.live for s in subjects) else self.object_prompts

    def single_subject_cases(self, names: Iterable[str] | None = None) -> list[BenchCase]:
        """Every subject (or those named) with each of its 25 prompts."""
        subjects = self.subjects if names is None else [self.subject(n) for n in names]
        return [case for s in subjects for case in self._cases((s,))]

    def multi_subject_cases(self, groups: Iterable[Sequence[str]]) -> list[BenchCase]:
        """Each group of subjects (pairs, usually) with each of its 25 prompts."""
        cases = []
        for names in groups:
            if len(set(names)) != len(names) or len(names) < 2:
                raise DreamBenchError(f"a multi-subject group needs two or more different subjects, got {list(names)}")
            cases.extend(self._cases(tuple(self.subject(n) for n in names)))
        return cases

    def _cases(self, subjects: tuple[BenchSubject, ...]) -> list[BenchCase]:
        return [BenchCase(subjects, i, t) for i, t in enumerate(self.templates(subjects))]


def _subject(folder: Path, class_name: str) -> BenchSubject:
    images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    if not images:
        raise DreamBenchError(f"subject folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return BenchSubject(folder.name, class_name, class_name in LIVE_CLASSES, images)


def load_groups(path: str | Path) -> list[tuple[str, ...]]:
    """Subject groups for the multi-subject variant: one group a line, names split by commas
    or spaces (`dog,teapot`); blank lines and `#` comments are skipped."""
    groups = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if line:
            groups.append(tuple(line.split()))
    if not groups:
        raise DreamBenchError(f"{path} lists no subject groups")
    return groups


@dataclass
class BenchScores:
    """Benchmark scores of one method: means over all generated images, and per subject."""

    method: str
    dino: float
    clip_i: float
    clip_t: float
    samples: int
    per_subject: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def evaluate(
    cases: Sequence[BenchCase],
    generate: Generate,
    metrics: MetricModels,
    method: str = "AnyStory",
    seed: int = 0,
    images_per_prompt: int = 1,
    references: Mapping[str, str] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> BenchScores:
    """Generate every case (or reuse the images already in `out_dir`) and score them.

    `references` maps a subject to the file name of its reference photo (default: the
    first). Image k of a prompt uses seed `seed + k`. Images are saved under `out_dir` as
    `<subjects>/<prompt index>_<k>.png`, so an interrupted run resumes where it stopped.
    """
    if not cases:
        raise DreamBenchError("no cases to evaluate")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    photos = _SubjectPhotos(metrics, references or {})
    scores: dict[str, list[tuple[float, float, float]]] = {}
    text_embeddings = {}
    for case in tqdm(cases, desc=f"DreamBench {method}", disable=not progress):
        if case.prompt not in text_embeddings:
            text_embeddings[case.prompt] = metrics.clip_text_embed([case.prompt])[0]
        for k in range(images_per_prompt):
            image = _generated(case, k, seed + k, photos, generate, out_dir)
            dino, clip_image = metrics.dino_embed([image])[0], metrics.clip_image_embed([image])[0]
            scores.setdefault(case.key, []).append(
                (
                    _mean([float((photos.dino(s) @ dino).mean()) for s in case.subjects]),
                    _mean([float((photos.clip(s) @ clip_image).mean()) for s in case.subjects]),
                    float(text_embeddings[case.prompt] @ clip_image),
                )
            )
    every = [row for rows in scores.values() for row in rows]
    return BenchScores(
        method=method,
        dino=_mean([r[0] for r in every]),
        clip_i=_mean([r[1] for r in every]),
        clip_t=_mean([r[2] for r in every]),
        samples=len(every),
        per_subject={key: tuple(_mean([r[i] for r in rows]) for i in range(3)) for key, rows in scores.items()},
    )


class _SubjectPhotos:
    """Each subject's reference photo and real-photo embeddings, computed on first use."""

    def __init__(self, metrics: MetricModels, references: Mapping[str, str]):
        self.metrics, self.references = metrics, references
        self._cache: dict[tuple[str, str], Any] = {}

    def _memo(self, kind: str, subject: BenchSubject, make: Callable[[], Any]):
        if (kind, subject.name) not in self._cache:
            self._cache[kind, subject.name] = make()
        return self._cache[kind, subject.name]

    def dino(self, subject: BenchSubject) -> torch.Tensor:
        return self._memo("dino", subject, lambda: self.metrics.dino_embed([_open(p) for p in subject.images]))

    def clip(self, subject: BenchSubject) -> torch.Tensor:
        return self._memo("clip", subject, lambda: self.metrics.clip_image_embed([_open(p) for p in subject.images]))

    def reference(self, subject: BenchSubject) -> Image.Image:
        """The photo given to the generator: the chosen one, else the first."""
        return self._memo("reference", subject, lambda: _open(self._reference_path(subject)))

    def _reference_path(self, subject: BenchSubject) -> Path:
        if subject.name not in self.references:
            return subject.images[0]
        name = self.references[subject.name]
        path = next((p for p in subject.images if p.name == name), None)
        if path is None:
            raise DreamBenchError(f"reference {name!r} is not among the photos of {subject.name!r}")
        return path


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise DreamBenchError(f"cannot read image {path}: {error}") from error


def _generated(case: BenchCase, k: int, seed: int, photos: _SubjectPhotos, generate: Generate, out_dir) -> Image.Image:
    """Image k of a case: read back from `out_dir` if there, else generated (and saved)."""
    path = None if out_dir is None else Path(out_dir) / case.key / f"{case.prompt_index:02d}_{k}.png"
    if path is not None and path.is_file():
        return _open(path)
    image = generate(case.prompt, [photos.reference(s) for s in case.subjects], seed)
    if not isinstance(image, Image.Image):
        raise TypeError(f"generate() must return a PIL image, got {type(image).__name__}")
    if path is not None:  # written whole or not at all, so that a resumed run never reads half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        image.save(partial, format="PNG")
        partial.replace(path)
    return image


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def format_table(results: Sequence[BenchScores], digits: int = 3) -> str:
    """A Markdown table in the form of UNO's Table 1: Method | DINO | CLIP-I | CLIP-T."""
    lines = ["| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.method} | {r.dino:.{digits}f} | {r.clip_i:.{digits}f} | {r.clip_t:.{digits}f} |")
    return "\n".join(lines)
