import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from anystory.training import (
    ManifestError, ManifestSource, Record, SampleError, SampleTransform, Trainer, TrainingData,
    WebDatasetSource, make_buckets,
)
from anystory.training.transforms import collate, nearest_bucket
from conftest import tiny_config
from shapes import pair_records, scene_records, write_pair_manifest, write_scene_manifest


def small_transform(**options) -> SampleTransform:
    defaults = dict(buckets=[(32, 32)], clip_size=32, clip_mean=[0.5] * 3, clip_std=[0.25] * 3, reference_size=32)
    return SampleTransform(**{**defaults, **options})


# -- manifests ----------------------------------------------------------------------------------


def test_manifests_round_trip(tmp_path):
    pairs = ManifestSource(write_pair_manifest(tmp_path / "pairs", pair_records(3)))
    scenes = ManifestSource(write_scene_manifest(tmp_path / "scenes", scene_records(3)))
    pair, scene = pairs[1], scenes[2]
    assert pair.references is not None and len(pair.masks) == 1
    assert np.array_equal(np.asarray(pair.image), np.asarray(pair_records(3)[1].image))
    assert scene.references is None and len(scene.masks) == 2
    assert np.array_equal(scene.masks[1], scene_records(3)[2].masks[1])
    assert pairs.image_size(0) == (32, 32)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"image": "a.png", "caption": "x"}', "missing key"),
        ('{"image": "a.png", "caption": "x", "instances": []}', "non-empty list"),
        ('{"reference_image": "a", "reference_mask": "b", "target_image": "c", "target_mask": 3, "caption": "x"}', "path strings"),
    ],
)
def test_malformed_manifest_names_the_line(tmp_path, line, message):
    good = json.dumps({"image": "a.png", "caption": "x", "instances": [{"mask": "m.png"}]})
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(f"{good}\n\n{good}\n{line}\n")
    with pytest.raises(ManifestError, match=rf"bad.jsonl:4: .*{message}"):
        ManifestSource(manifest)


def test_corrupt_and_missing_samples_are_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "pairs"
    manifest = write_pair_manifest(folder, pair_records(8))
    (folder / "pair2.png").unlink()  # missing target image
    (folder / "pair5_ref.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt reference
    config = tiny_config(1, tmp_path / "run", f"data.manifest={manifest}", "train.max_steps=4", "train.batch_size=4")
    with caplog.at_level(logging.WARNING):
        Trainer(config, stage=1).train()
    skipped = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    # 4 steps of 4 samples = 2 epochs of the 8 samples: each bad sample is met twice
    assert len(skipped) == 4
    assert sum("pair2.png" in m for m in skipped) == 2 and sum("pair5_ref.png" in m for m in skipped) == 2


# -- WebDataset shards ---------------------------------------------------------------------------


def _png_bytes(image) -> bytes:
    import io

    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) * 255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_scene_shard(path: Path, records: list[Record], corrupt: int | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, record in enumerate(records):
            files = {"image.png": _png_bytes(record.image), "caption.txt": record.caption.encode()}
            files.update({f"mask_{j}.png": _png_bytes(m) for j, m in enumerate(record.masks)})
            if i == corrupt:
                files["image.png"] = b"not an image"
            for name, data in files.items():
                info = tarfile.TarInfo(f"{record.key}.{name}")
                info.size = len(data)
                tar.addfile(info, __import__("io").BytesIO(data))
    return path


def test_webdataset_shards_stream_records_and_flag_corrupt_samples(tmp_path):
    records = scene_records(6)
    write_scene_shard(tmp_path / "scenes-000.tar", records[:3], corrupt=1)
    write_scene_shard(tmp_path / "scenes-001.tar", records[3:])
    source = WebDatasetSource(str(tmp_path / "scenes-{000..001}.tar"), shuffle_buffer=0)
    items = list(source)
    assert sum(isinstance(i, SampleError) for i in items) == 1
    decoded = {i.key: i for i in items if isinstance(i, Record)}
    assert sorted(decoded) == sorted(r.key for r in records if r.key != "scene1")
    assert np.array_equal(decoded["scene4"].masks[1], records[4].masks[1])
    assert decoded["scene4"].caption == records[4].caption


def test_missing_shards_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard"):
        WebDatasetSource(str(tmp_path / "none-{000..003}.tar"))


# -- transforms ------------------------------------------------------------------------------------


def test_buckets_keep_area_and_ratio():
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets and (768, 1344) in buckets
    assert all(h * w <= 1024 * 1024 and max(h, w) / min(h, w) <= 2.0 and h % 64 == w % 64 == 0 for h, w in buckets)
    assert buckets[nearest_bucket(buckets, 600, 1050)] == (768, 1344)


def test_micro_conditioning_records_original_size_and_crop():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    mask = np.zeros((40, 64), bool)
    mask[10:30, 20:40] = True
    transform = small_transform(random_crop=False)
    sample = transform(Record(image, "a red star", [mask]), np.random.default_rng(0))
    # resize 40x64 -> 32x51 to cover 32x32, centre crop left = (51 - 32) // 2
    assert sample["time_ids"].tolist() == [40, 64, 0, 9, 32, 32]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["target_masks"].shape == (1, 32, 32)
    assert sample["target_masks"][0, 16, 16] == 1 and sample["target_masks"][0, 0, 0] == 0


def test_reference_augmentation_keeps_pixels_inside_the_mask():
    record = pair_records(1)[0]
    transform = small_transform(rotation_degrees=30, scale_range=(0.6, 0.6), shift_fraction=0.0)
    sample = transform(record, np.random.default_rng(1))
    pixels, mask = sample["reference_pixels"][0], sample["reference_masks"][0]
    assert torch.all(pixels[:, mask[0] == 0] == 0)  # segmented: zero outside the mask
    assert mask[0, 0].sum() == 0 and mask[0, -1].sum() == 0  # scale 0.6: zero-padded border
    unaugmented = small_transform(rotation_degrees=0, scale_range=(1, 1), shift_fraction=0.0)(record, np.random.default_rng(1))
    assert unaugmented["reference_masks"].sum() > mask.sum() * 1.5


def test_stage2_cuts_references_from_the_target_and_pads_subject_counts():
    one, two = scene_records(2)
    one = Record(one.image, one.caption, one.masks[:1], key="one")
    transform = small_transform(max_subjects=4)
    batch = collate([transform(one, np.random.default_rng(0)), transform(two, np.random.default_rng(0)), SampleError("bad")])
    assert batch["subject_valid"].tolist() == [[True, False], [True, True]]
    assert batch["clip_pixels"].shape == (2, 2, 3, 32, 32) and batch["skipped"] == ["bad"]
    assert batch["target_masks"][0, 1].sum() == 0


# -- loader positions ----------------------------------------------------------------------------


def _keys(batches, count):
    return [tuple(next(batches)["keys"]) for _ in range(count)]


@pytest.mark.parametrize("streamed", [False, True])
def test_loader_resumes_at_any_position(streamed):
    records = pair_records(10)
    source = _Stream(records) if streamed else records
    data = TrainingData(source, small_transform(max_subjects=1), batch_size=3, seed=0)
    reference = _keys(data.batches(0), 8)  # 3 batches per epoch: crosses two epoch ends
    if not streamed:  # map-style epochs are reshuffled; a stream keeps its source's order
        assert len(set(reference[:3]) | set(reference[3:6])) > 3
    for start in (2, 3, 5):
        assert _keys(data.batches(start), 3) == reference[start:start + 3]


def test_processes_get_disjoint_batches():
    records = pair_records(12)
    shares = [TrainingData(records, small_transform(), 2, seed=0, rank=r, world=2) for r in (0, 1)]
    first, second = (set(k for b in _keys(d.batches(0), 3) for k in b) for d in shares)
    assert not first & second and len(first | second) == 12


class _Stream:
    """An iterable (not a sequence) of records, as a streaming source would be."""

    def __init__(self, records):
        self.records = records

    def __iter__(self):
        return iter(self.records)


def test_subject_groups_travel_from_record_to_batch_with_padding_alone():
    from PIL import Image

    image = Image.new("RGB", (64, 64))
    masks = [np.zeros((64, 64), bool) for _ in range(3)]
    for k, mask in enumerate(masks):
        mask[8:24, 4 + 20 * k:16 + 20 * k] = True
    transform = small_transform(buckets=[(64, 64)], max_subjects=3)
    twins = transform(Record(image, "x", masks, key="a", subject_groups=[5, 0, 5]), np.random.default_rng(0))
    alone = transform(Record(image, "x", masks[:2], key="b"), np.random.default_rng(0))
    batch = collate([twins, alone])
    labels = batch["subject_groups"]
    assert labels.shape == (2, 3) and labels[1, 2] == -1 and labels[1, 0] != labels[1, 1]
    chosen = twins["subject_groups"].tolist()  # the transform may reorder subjects: labels follow them
    assert sorted(chosen) == [0, 5, 5]
    with pytest.raises(SampleError, match="subject_groups"):
        Record(image, "x", masks, key="c", subject_groups=[0, 1])
