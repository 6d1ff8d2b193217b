"""The reference-gain probe: its control (the twin reference) and its plumbing."""

import numpy as np
import pytest
import torch

from anystory.mini import WEIGHTS_DIR, load_pipeline
from anystory.mini.claims import single_subject_groups
from anystory.mini.diagnostics import reference_gain, twin_reference
from anystory.mini.world import MiniWorld

SHIPPED = all((WEIGHTS_DIR / folder / "config.json").exists() for folder in ("adapter", "adapter_clip_only"))


def test_twin_reference_differs_from_the_reference_only_in_the_pattern():
    world = MiniWorld()
    for group in single_subject_groups(8):
        truth, reference, twin = group.identities[0], group.references[0], twin_reference(world, group)
        (twin_identity,) = [p.identity for p in twin.scene.placements]
        assert twin_identity != truth and (twin_identity.shape, twin_identity.colour) == (truth.shape, truth.colour)
        assert np.array_equal(twin.masks, reference.masks)
        changed = (twin.image != reference.image).any(-1)
        assert changed.any() and not changed[~reference.masks[0]].any()


@pytest.mark.skipif(not SHIPPED, reason="the mini world's adapters are not trained yet")
def test_gain_is_zero_without_a_path_for_the_reference_and_nonzero_with_one():
    torch.set_num_threads(1)
    # CLIP-only adapter with the CLIP branch silenced: nothing of the reference reaches the U-Net
    silent = reference_gain(load_pipeline("adapter_clip_only"), count=4, timesteps=(500,), subject_scale=0.0)
    assert silent.errors["true"] == silent.errors["twin"] == silent.errors["none"] and silent.gain[500] == 0.0
    # the ReferenceNet alone (eta = 0) sees the pattern, so the two references give different errors
    reference_only = reference_gain(load_pipeline("adapter"), count=4, timesteps=(500,), subject_scale=0.0)
    assert reference_only.errors["true"][500] != reference_only.errors["twin"][500]
    assert reference_only.errors["true"][500] != reference_only.errors["none"][500]
    assert 0 < reference_only.errors["true"][500] < 2
