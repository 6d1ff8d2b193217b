"""The main job (`anystory demo`) on the shipped mini-world weights."""

import re

import numpy as np
from PIL import Image

from anystory import AnyStorySDXLPipeline
from anystory.cli import main


def test_demo_writes_images_routing_overlays_storyboard_and_index(tmp_path, monkeypatch):
    encoded = []
    original = AnyStorySDXLPipeline.encode_subjects
    monkeypatch.setattr(
        AnyStorySDXLPipeline, "encode_subjects",
        lambda self, subjects: encoded.append([s.name for s in subjects]) or original(self, subjects),
    )
    assert main(["demo", "--out", str(tmp_path)]) == 0

    index = (tmp_path / "index.html").read_text()
    linked = re.findall(r"src='([^']+)'", index)
    assert linked and all((tmp_path / path).is_file() for path in linked)
    for name in ("single", "pair"):
        image = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert image.shape == (64, 64, 3) and image.std() > 5  # a picture, not a flat field
        overlay = np.asarray(Image.open(tmp_path / f"{name}_routing.png"))
        assert overlay.shape == image.shape and not np.array_equal(overlay, image)  # some region is routed
    frames = sorted((tmp_path / "storyboard" / "frames").glob("*.png"))
    assert len(frames) == 3 and (tmp_path / "storyboard" / "contact_sheet.png").is_file()
    # the storyboard encodes its two characters once for all three frames
    assert encoded[-1] == ["Hero", "Friend"] and len(encoded) == 3
