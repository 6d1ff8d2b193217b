from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anystory import Subject, SubjectError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dreambench-subset"


def test_real_jpeg_photos_without_masks_preprocess():
    photos = sorted(FIXTURES.glob("*/*.jpg"))
    assert len(photos) >= 4
    for path in photos:
        subject = Subject(path)
        assert subject.mask.all() and subject.mask.shape == (subject.image.height, subject.image.width)
        clip = subject.clip_pixels(224, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
        ref, mask = subject.reference_pixels(512)
        assert clip.shape == (3, 224, 224) and ref.shape == (3, 512, 512) and mask.shape == (1, 512, 512)
        assert ref.min() >= -1 and ref.max() <= 1
        assert subject.name == path.stem


def test_crop_is_a_square_around_the_mask_with_margin_and_zero_padding():
    image = np.full((100, 200, 3), 200, dtype=np.uint8)
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:30, 150:190] = True  # 20 x 40 box near the right edge
    subject = Subject(image, mask)
    left, top, right, bottom = subject.crop_box(margin=0.1)
    assert right - left == bottom - top == 48  # 40 * 1.2
    assert (left + right) / 2 == 170 and (top + bottom) / 2 == 20
    pixels, soft_mask = subject.cropped(48)
    # the crop runs past the image's top edge: rows above it are zero-padded
    assert torch.all(pixels[:, :4] == 0) and torch.all(soft_mask[:, :4] == 0)


def test_outside_the_mask_is_zero_in_each_encoders_normalised_space():
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 24:40] = True
    subject = Subject(image, mask)
    clip = subject.clip_pixels(32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    ref, ref_mask = subject.reference_pixels(32)
    outside = ref_mask[0] == 0
    assert outside.any() and torch.all(clip[:, outside] == 0) and torch.all(ref[:, outside] == 0)
    inside = ref_mask[0] == 1
    assert torch.allclose(clip[:, inside], torch.tensor(2.0)) and torch.allclose(ref[:, inside], torch.tensor(1.0))


def test_rgba_alpha_is_the_mask_and_an_opaque_alpha_is_not(tmp_path):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[5:15, 10:20] = (255, 0, 0, 255)
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba).save(path)
    assert Subject(path).mask.sum() == 100
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(path)
    assert Subject(path).mask.all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("not an image"), "not a readable image"),
        (lambda p: None, "not found"),
        (lambda p: Image.new("1", (9000, 9000)).save(p), "pixel limit"),
        (lambda p: Image.new("RGB", (4, 40)).save(p), "at least"),
    ],
)
def test_bad_image_files_name_the_problem(tmp_path, make, message):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(SubjectError, match=message):
        Subject(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(SubjectError, match="truncated or corrupt|not a readable"):
        Subject(path)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.zeros((20, 30), dtype=bool), "empty"),
        (np.ones((20, 30), dtype=bool), "whole image"),
        (np.ones((21, 30), dtype=bool), "does not match image size"),
        (np.zeros((20, 30), dtype=np.float64), "uint8"),
    ],
)
def test_bad_masks_name_the_problem(mask, message):
    with pytest.raises(SubjectError, match=message):
        Subject(np.zeros((20, 30, 3), dtype=np.uint8), mask)
