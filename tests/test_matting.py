"""Matting: alpha first, then a pluggable backend; a clear error when there is none."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

from anystory import matting
from anystory.matting import (
    MattingError,
    TransformersSegmentation,
    as_mask,
    available_backends,
    extract_mask,
    get_backend,
    matted_subject,
    register_matting_backend,
)


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Each test starts with no registered backend and without rembg."""
    monkeypatch.setattr(matting, "_BACKENDS", {})
    monkeypatch.setitem(sys.modules, "rembg", None)


def box_mask(width=40, height=30, box=(5, 4, 25, 20)) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = True
    return mask


def never_called(image):
    raise AssertionError("the backend must not be called")


def test_alpha_channel_comes_first():
    register_matting_backend("fail", never_called)
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., 3] = box_mask() * 200
    mask = extract_mask(Image.fromarray(rgba, "RGBA"))
    assert mask.dtype == bool and mask.shape == (30, 40)
    assert np.array_equal(mask, box_mask())


def test_opaque_alpha_falls_through_to_the_backend():
    register_matting_backend("box", lambda image: box_mask(image.width, image.height))
    opaque = Image.new("RGBA", (40, 30), (9, 9, 9, 255))
    assert np.array_equal(extract_mask(opaque), box_mask())


def test_backend_output_is_resized_to_the_image_and_thresholded():
    low_res = np.zeros((15, 20), dtype=np.float32)
    low_res[2:10, 3:13] = 0.9  # a soft half-size matte
    register_matting_backend("soft", lambda image: low_res)
    mask = extract_mask(Image.new("RGB", (40, 30)))
    assert mask.shape == (30, 40) and mask.dtype == bool
    assert mask[10, 15] and not mask[25, 35] and not mask[0, 0]
    assert 0.2 < mask.mean() < 0.35  # about the 10 x 8 box of 20 x 15, doubled


@pytest.mark.parametrize(
    "output",
    [
        box_mask(),
        box_mask().astype(np.uint8) * 255,
        box_mask().astype(np.float32),
        torch.from_numpy(box_mask()).float()[None],
        Image.fromarray(box_mask().astype(np.uint8) * 255),
    ],
    ids=["bool", "uint8", "float", "tensor", "pil"],
)
def test_every_mask_type_is_understood(output):
    assert np.array_equal(as_mask(output, (40, 30)), box_mask())


def test_last_registered_backend_is_the_default_and_names_select():
    register_matting_backend("left", lambda image: box_mask(box=(0, 0, 20, 30)))
    register_matting_backend("right", lambda image: box_mask(box=(20, 0, 40, 30)))
    image = Image.new("RGB", (40, 30))
    assert available_backends() == ["right", "left"]
    assert extract_mask(image)[:, 30].all() and not extract_mask(image)[:, 10].any()
    assert extract_mask(image, backend="left")[:, 10].all()
    assert extract_mask(image, backend=lambda im: box_mask())[10, 10]


def test_no_backend_error_says_how_to_give_a_mask():
    assert available_backends() == []
    with pytest.raises(MattingError) as error:
        extract_mask(Image.new("RGB", (40, 30)))
    message = str(error.value)
    for hint in ("no matting backend is available", "Subject(image, mask)", "IMAGE:MASK", "rembg", "register_matting_backend"):
        assert hint in message
    with pytest.raises(MattingError, match="needs `pip install rembg`"):
        get_backend("rembg")
    with pytest.raises(MattingError, match="unknown matting backend 'sam'"):
        get_backend("sam")


def test_empty_matte_is_an_error():
    register_matting_backend("nothing", lambda image: np.zeros((30, 40)))
    with pytest.raises(MattingError, match="found no subject in the 40x30 image"):
        extract_mask(Image.new("RGB", (40, 30)))


def test_rembg_backend_when_installed(monkeypatch):
    calls = []
    fake = types.ModuleType("rembg")
    fake.new_session = lambda name: f"session:{name}"

    def remove(image, only_mask, session):
        calls.append((image.size, only_mask, session))
        return Image.fromarray(box_mask(image.width, image.height).astype(np.uint8) * 255)

    fake.remove = remove
    monkeypatch.setitem(sys.modules, "rembg", fake)
    monkeypatch.setattr(matting.importlib.util, "find_spec", lambda name: object() if name == "rembg" else None)
    assert available_backends() == ["rembg"]
    mask = extract_mask(Image.new("RGB", (40, 30)))
    assert np.array_equal(mask, box_mask())
    assert calls == [((40, 30), True, "session:u2net")]


def test_matted_subject_uses_the_matte_and_skips_it_when_a_mask_is_given():
    register_matting_backend("box", lambda image: box_mask(image.width, image.height))
    image = Image.new("RGB", (40, 30), "white")
    assert np.array_equal(matted_subject(image).mask, box_mask())
    register_matting_backend("fail", never_called)
    given = matted_subject(image, mask=box_mask(box=(0, 0, 10, 10)))
    assert given.mask.sum() == 100


def test_matte_covering_everything_makes_a_whole_image_subject():
    register_matting_backend("all", lambda image: np.ones((image.height, image.width), dtype=bool))
    subject = matted_subject(Image.new("RGB", (40, 30)))
    assert subject.mask.all()


def save_tiny_segformer(folder, winner: int):
    """A random 2-class Segformer whose classifier always picks class `winner`."""
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[7],
        strides=[4], num_attention_heads=[1], mlp_ratios=[2], decoder_hidden_size=8,
        num_labels=2, id2label={0: "background", 1: "subject"}, label2id={"background": 0, "subject": 1},
    )
    model = SegformerForSemanticSegmentation(config)
    with torch.no_grad():
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.copy_(torch.tensor([5.0, 0.0] if winner == 0 else [0.0, 5.0]))
    model.save_pretrained(folder)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def segformer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("segformer")
    return save_tiny_segformer(root / "subject", 1), save_tiny_segformer(root / "background", 0)


def test_transformers_segmentation_from_a_local_folder(segformer_dirs):
    subject_everywhere, background_everywhere = segformer_dirs
    image = Image.new("RGB", (45, 31), "red")  # odd size: the mask must come back at it
    backend = get_backend(str(subject_everywhere))
    assert isinstance(backend, TransformersSegmentation)
    mask = extract_mask(image, backend=backend)
    assert mask.shape == (31, 45) and mask.dtype == bool and mask.all()
    with pytest.raises(MattingError, match="found no subject"):
        extract_mask(image, backend=background_everywhere)  # only "background": nothing kept
    chosen = TransformersSegmentation(background_everywhere, labels=["background"])
    assert extract_mask(image, backend=chosen).all()


def test_transformers_segmentation_errors(tmp_path):
    with pytest.raises(MattingError, match="segmentation model folder not found"):
        TransformersSegmentation(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not weights")  # and no config.json
    with pytest.raises(MattingError, match="cannot load a segmentation model from .*broken: "):
        extract_mask(Image.new("RGB", (40, 30)), backend=TransformersSegmentation(tmp_path / "broken"))


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file

    folder = save_tiny_segformer(tmp_path / "pickled", 1)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    image = Image.new("RGB", (40, 30))
    with pytest.raises(MattingError, match="no safetensors weights in .*allow_pickle=True"):
        extract_mask(image, backend=TransformersSegmentation(folder))
    assert extract_mask(image, backend=TransformersSegmentation(folder, allow_pickle=True)).all()
