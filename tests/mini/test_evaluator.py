"""The shipped evaluator reads held-out ground truth (it never sees generated images)."""

import numpy as np
import pytest
import torch

from anystory.mini.evaluator import MiniEvaluator, label_components, measure_accuracy
from anystory.mini.world import MiniWorld, Placement, Scene, distractors, identities


@pytest.fixture(scope="module")
def evaluator():
    torch.set_num_threads(1)
    return MiniEvaluator.from_pretrained()


def test_shipped_evaluator_is_accurate_on_held_out_ground_truth(evaluator):
    report = measure_accuracy(evaluator, count=150, seed=2024)
    assert report["identity"] >= 0.95
    assert report["found"] >= 0.97 and report["count"] >= 0.95
    assert min(report["colour"], report["position"], report["background"]) >= 0.95
    assert report["shape"] >= 0.9


def test_identity_survives_a_flip_and_beats_same_attribute_distractors(evaluator):
    world, rng = MiniWorld(), np.random.default_rng(0)
    identity = next(i for i in identities("held_out") if i.shape == "circle" and i.colour == "green")
    candidates = [*distractors(identity, 6, rng), identity]
    scenes = [
        Scene("city", 3, False, 0, (Placement(identity, 30.0, 34.0, 32.0, angle=8.0, flipped=flip),))
        for flip in (False, True)
    ]
    for reading in evaluator.read([world.render(s).image for s in scenes]):
        (region,) = reading.regions
        assert (region.shape, region.colour, region.position) == ("circle", "green", "middle")
        assert region.identify(candidates) == len(candidates) - 1


def test_regions_are_connected_components():
    foreground = torch.zeros(64, 64, dtype=torch.bool)
    foreground[5:20, 5:20] = True
    foreground[30:50, 40:44] = True
    foreground[60:62, 60:62] = True  # 4 pixels: too small to be a subject
    regions = label_components(foreground)
    assert [int(r.sum()) for r in regions] == [225, 80]


def test_reading_refuses_other_resolutions(evaluator):
    with pytest.raises(ValueError, match="64x64"):
        evaluator.read(np.zeros((32, 32, 3), dtype=np.uint8))
