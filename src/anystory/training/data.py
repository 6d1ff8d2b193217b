"""Record sources: where training samples come from, as in-memory `Record`s.

Three sources, one record type:
- `ManifestSource`: a JSONL manifest of stage-1 pairs or stage-2 multi-subject images
  (map-style, paths relative to the manifest);
- `WebDatasetSource`: the same samples streamed from WebDataset tar shards (iterable);
- any `Sequence` or iterable of `Record`s (the mini world passes its own).

Loading a sample may fail (missing or corrupt file, bad mask): that raises `SampleError`,
which the loader counts and skips. A malformed manifest line is a `ManifestError` naming
the line, raised at once: it is the user's file, not a bad sample.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset

from ..subject import SubjectError, load_image


class ManifestError(ValueError):
    """A manifest that cannot be read, with the file and line number."""


class SampleError(ValueError):
    """One sample that cannot be used (missing/corrupt file, mismatched mask): skipped."""


@dataclass
class Record:
    """One training sample, decoded.

    image: the target image; masks: the subjects' whole-instance masks in it (bool H x W);
    references: per subject, the reference (image, mask) from another context (stage-1
    pairs) or None, in which case each reference is cut from `image` itself (stage 2);
    subject_groups: optional per-subject labels, equal for subjects the caption cannot
    tell apart (twins): the stage-2 routing loss may swap their ground-truth masks.
    """

    image: Image.Image
    caption: str
    masks: list[np.ndarray]
    references: list[tuple[Image.Image, np.ndarray]] | None = None
    key: str = ""
    subject_groups: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.masks:
            raise SampleError(f"sample {self.key!r} has no subject mask")
        size = (self.image.height, self.image.width)
        for mask in self.masks:
            if mask.shape != size:
                raise SampleError(f"sample {self.key!r}: mask {mask.shape} does not match image {size}")
        if self.references is not None and len(self.references) != len(self.masks):
            raise SampleError(f"sample {self.key!r}: {len(self.references)} references for {len(self.masks)} masks")
        if self.subject_groups is not None and (
            len(self.subject_groups) != len(self.masks) or min(self.subject_groups) < 0
        ):
            raise SampleError(f"sample {self.key!r}: subject_groups {self.subject_groups} must be "
                              f"{len(self.masks)} labels >= 0, one per mask")


def load_mask(source, what: str) -> np.ndarray:
    """A mask file/image/array as bool (H, W): pixels >= 128 (or True) are the subject."""
    return np.asarray(load_image(source, what).convert("L")) >= 128


def _rgb(source, what: str) -> Image.Image:
    try:
        return load_image(source, what).convert("RGB")
    except (SubjectError, OSError, SyntaxError) as error:  # PIL raises SyntaxError on some broken files
        raise SampleError(f"{what}: {error}") from None


def _mask_for(image: Image.Image, source, what: str) -> np.ndarray:
    try:
        mask = load_mask(source, what)
    except (SubjectError, OSError, SyntaxError) as error:
        raise SampleError(f"{what}: {error}") from None
    if mask.shape != (image.height, image.width):
        raise SampleError(f"{what} is {mask.shape[1]}x{mask.shape[0]}, its image {image.width}x{image.height}")
    return mask


# -- JSONL manifests -------------------------------------------------------------------------

PAIR_KEYS = ("reference_image", "reference_mask", "target_image", "target_mask", "caption")
SCENE_KEYS = ("image", "caption", "instances")


class ManifestSource:
    """A JSONL manifest, parsed and validated up front; images are read per sample.

    Stage-1 row: {"reference_image", "reference_mask", "target_image", "target_mask", "caption"};
    stage-2 row: {"image", "caption", "instances": [{"mask": ...}, ...]}. Paths are relative
    to the manifest's folder. Both kinds may be mixed in one file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ManifestError(f"manifest not found: {self.path}")
        self.root = self.path.parent
        self.rows = self._parse()
        if not self.rows:
            raise ManifestError(f"manifest {self.path} has no samples")

    def _parse(self) -> list[dict]:
        rows = []
        with self.path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    rows.append(self._validate(line, number))
        return rows

    def _validate(self, line: str, number: int) -> dict:
        where = f"{self.path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        required = SCENE_KEYS if "instances" in row else PAIR_KEYS
        missing = [k for k in required if k not in row]
        if missing:
            raise ManifestError(
                f"{where}: missing key(s) {missing}; a stage-1 row needs {list(PAIR_KEYS)}, "
                f"a stage-2 row needs {list(SCENE_KEYS)}"
            )
        if not isinstance(row["caption"], str):
            raise ManifestError(f"{where}: 'caption' must be a string")
        if "instances" in row:
            instances = row["instances"]
            if not isinstance(instances, list) or not instances or not all(
                isinstance(i, dict) and isinstance(i.get("mask"), str) for i in instances
            ):
                raise ManifestError(f"{where}: 'instances' must be a non-empty list of {{\"mask\": path}} objects")
        elif not all(isinstance(row[k], str) for k in PAIR_KEYS[:4]):
            raise ManifestError(f"{where}: image and mask entries must be path strings")
        row["_line"] = number
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def image_size(self, index: int) -> tuple[int, int] | None:
        """(height, width) of the target image from its header (for bucketing); None if unreadable."""
        row = self.rows[index]
        try:
            with Image.open(self.root / row.get("image", row.get("target_image"))) as image:
                return image.height, image.width
        except (OSError, SyntaxError):
            return None

    def __getitem__(self, index: int) -> Record:
        row = self.rows[index]
        key = f"{self.path.name}:{row['_line']}"
        path = lambda name: self.root / name  # noqa: E731
        if "instances" in row:
            image = _rgb(path(row["image"]), "image")
            masks = [_mask_for(image, path(i["mask"]), "instance mask") for i in row["instances"]]
            groups = [i["group"] for i in row["instances"]] if all("group" in i for i in row["instances"]) else None
            return Record(image=image, caption=row["caption"], masks=masks, key=key, subject_groups=groups)
        reference = _rgb(path(row["reference_image"]), "reference image")
        reference_mask = _mask_for(reference, path(row["reference_mask"]), "reference mask")
        target = _rgb(path(row["target_image"]), "target image")
        target_mask = _mask_for(target, path(row["target_mask"]), "target mask")
        return Record(
            image=target, caption=row["caption"], masks=[target_mask], references=[(reference, reference_mask)], key=key
        )


# -- WebDataset shards -----------------------------------------------------------------------


def decode_webdataset_sample(sample: dict) -> Record:
    """A WebDataset sample (files sharing one key) -> Record. Stage 1: image.*, mask.*,
    reference.*, reference_mask.*, caption.txt; stage 2: image.*, caption.txt, mask_0.*, mask_1.*, ..."""
    key = sample.get("__key__", "")
    files = {name.split(".")[0]: data for name, data in sample.items() if not name.startswith("__")}
    missing = [k for k in ("image", "caption") if k not in files]
    if missing:
        raise SampleError(f"tar sample {key!r} lacks {missing}")
    caption = files["caption"].decode("utf-8").strip()
    image = _rgb(_open(files["image"], key), "image")
    if "reference" in files:
        if "mask" not in files or "reference_mask" not in files:
            raise SampleError(f"tar sample {key!r}: a pair needs mask and reference_mask files")
        reference = _rgb(_open(files["reference"], key), "reference image")
        reference_mask = _mask_for(reference, _open(files["reference_mask"], key), "reference mask")
        mask = _mask_for(image, _open(files["mask"], key), "target mask")
        return Record(image=image, caption=caption, masks=[mask], references=[(reference, reference_mask)], key=key)
    mask_names = sorted((n for n in files if n.startswith("mask_") and n[5:].isdigit()), key=lambda n: int(n[5:]))
    if not mask_names:
        raise SampleError(f"tar sample {key!r} has no mask_<i> files")
    masks = [_mask_for(image, _open(files[n], key), "instance mask") for n in mask_names]
    return Record(image=image, caption=caption, masks=masks, key=key)


def _open(data: bytes, key: str) -> Image.Image:
    """Lazily open image bytes (header only: `load_image` checks the size before decoding)."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises several types on garbage bytes
        raise SampleError(f"tar sample {key!r}: unreadable image bytes ({error})") from None


class WebDatasetSource(IterableDataset):
    """Samples streamed from tar shards (the `webdataset` package), shard order shuffled
    per epoch, split across processes and data-loader workers; a buffer shuffle mixes
    samples. Undecodable samples are yielded as `SampleError`s for the loader to count.
    Give at least as many shards as processes x workers: shards are the unit of splitting."""

    splits_itself = True

    def __init__(self, shards: str | list[str], seed: int = 0, shuffle_buffer: int = 1000):
        import webdataset as wds  # optional dependency, needed only here
        from braceexpand import braceexpand

        patterns = [shards] if isinstance(shards, str) else list(shards)
        self.urls = [url for pattern in patterns for url in braceexpand(pattern)]
        missing = [u for u in self.urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
        self.wds, self.seed, self.shuffle_buffer, self.epoch = wds, seed, shuffle_buffer, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Record | SampleError]:
        wds = self.wds
        urls = list(self.urls)
        random.Random(self.seed + self.epoch).shuffle(urls)
        dataset = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
            handler=wds.warn_and_continue, empty_check=False,
        )
        if self.shuffle_buffer > 1:
            dataset = dataset.shuffle(self.shuffle_buffer, rng=random.Random(self.seed + self.epoch))
        for sample in dataset:
            try:
                yield decode_webdataset_sample(sample)
            except SampleError as error:
                yield error
