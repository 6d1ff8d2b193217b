"""The probes: the reference gain (its control, the twin reference, and its plumbing) and
the position probe (its coordinates, its regression, and a real reading), and the routing
claim's model-free ceilings."""

import numpy as np
import pytest
import torch

from anystory.mini import WEIGHTS_DIR, load_pipeline
from anystory.mini.claims import SAMPLING, has_twins, pair_groups, routing_scenes, single_subject_groups, uint8_images
from anystory.mini.diagnostics import (
    _owned_identity,
    chance_iou,
    noise_matched,
    noised_start,
    pattern_visibility,
    plain_bodies,
    position_probe,
    reference_gain,
    ridge_accuracy,
    ridge_r2,
    router_inputs,
    routing_ceilings,
    schedule_tail,
    subject_cells,
    true_layout,
    token_coordinates,
    twin_reference,
)
from anystory.mini.evaluator import MiniEvaluator
from anystory.mini.models import build_sampling_scheduler
from anystory.mini.world import Identity, MiniWorld, Placement, Scene, canonical_pattern, palette

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


def test_token_coordinates_cover_the_subject_with_the_image_handedness():
    world = MiniWorld()
    identity = Identity("circle", "blue", canonical_pattern(0b000000111))
    plain, flipped = (
        world.render(Scene("snow", 0, False, 0, (Placement(identity, 32.0, 32.0, 30.0, flipped=f),)))
        for f in (False, True)
    )
    on_subject, coordinates = token_coordinates(plain, 64)  # one token per pixel
    assert np.array_equal(on_subject, plain.masks[0].reshape(-1))
    assert np.abs(coordinates).max() <= 1.06 and len(coordinates) == plain.masks[0].sum()
    # a pixel right of the centre has u > 0 whether or not the pattern is mirrored
    on_flipped, flipped_coordinates = token_coordinates(flipped, 64)
    assert np.array_equal(on_flipped, on_subject) and np.allclose(flipped_coordinates, coordinates)
    coarse_on, coarse = token_coordinates(plain, 16)
    assert coarse_on.shape == (256,) and 0 < coarse_on.sum() < 256 and np.allclose(coarse.mean(0), 0, atol=0.1)


def test_ridge_r2_reads_linear_structure_and_nothing_else():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(400, 2))
    mixing = rng.normal(size=(2, 16))
    features = targets @ mixing + 0.01 * rng.normal(size=(400, 16))
    assert ridge_r2(features[:200], targets[:200], features[200:], targets[200:]) > 0.99
    noise = rng.normal(size=(400, 16))
    assert abs(ridge_r2(noise[:200], targets[:200], noise[200:], targets[200:])) < 0.1


def test_ridge_accuracy_reads_linearly_separable_labels_and_chance_from_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=2000)
    features = np.eye(5)[labels] @ rng.normal(size=(5, 12)) + 0.05 * rng.normal(size=(2000, 12))
    assert ridge_accuracy(features[:1000], labels[:1000], features[1000:], labels[1000:], 5) > 0.99
    noise = rng.normal(size=(2000, 12))
    assert abs(ridge_accuracy(noise[:1000], labels[:1000], noise[1000:], labels[1000:], 5) - 0.2) < 0.05


def test_subject_cells_are_the_grid_cells_a_mask_covers_at_least_half():
    masks = np.zeros((2, 64, 64), bool)
    masks[0, :16, :16] = True  # exactly cell (0, 0) of a 4 x 4 grid
    masks[1, 40:64, 40:64] = True  # all of cell (3, 3), half of (2, 3) and (3, 2), a quarter of (2, 2)
    first, second = subject_cells(masks, 4)
    assert first.tolist() == [0] and second.tolist() == [11, 14, 15]
    assert len(subject_cells(masks, 16)[0]) == 16


def test_chance_iou_splits_each_subject_among_those_a_router_cannot_tell_apart():
    twins = [Identity("circle", "red", 1), Identity("circle", "red", 3), Identity("square", "blue", 1)]
    by_attributes = lambda i: (i.shape, i.colour)  # noqa: E731
    assert chance_iou(twins, by_attributes) == pytest.approx((0.5 + 0.5 + 1) / 3)
    same_colour = [Identity("circle", "red", 1), Identity("square", "red", 1)]
    assert chance_iou(same_colour, by_attributes) == 1.0
    assert chance_iou(same_colour, lambda i: (i.colour,)) == 0.5


def test_noise_matched_reads_each_step_at_a_lower_sigma_and_clamps_past_the_last():
    sigmas = np.array([8.0, 4.0, 2.0, 1.0, 0.0])  # a scheduler's sigmas end with 0
    assert noise_matched([0.0, 1.0, 2.0, 3.0], sigmas, ratio=1) == pytest.approx([0, 1, 2, 3])
    assert noise_matched([0.0, 1.0, 2.0, 3.0], sigmas, ratio=2) == pytest.approx([1, 2, 3, 3])
    assert noise_matched([0.0, 1.0, 2.0, 3.0], sigmas, ratio=2 ** 0.5)[0] == pytest.approx(0.5)


def test_routing_ceilings_fall_below_one_exactly_as_the_scenes_hold_twins():
    casts = [group.identities for group in routing_scenes(16)]
    ceilings = routing_ceilings(16, per_step=[0.1] * 25)
    with_twins = sum(has_twins(c) for c in casts)
    assert 0 < with_twins < 16 and ceilings.twins_at_chance < 1
    assert ceilings.twins_at_chance <= 1 - with_twins / 16 * (1 - 2 / 3)  # a scene with twins scores <= 2/3
    assert ceilings.colour_at_chance <= ceilings.twins_at_chance  # twins always share their colour
    assert ceilings.sdxl_noise_mean == pytest.approx(0.1)


@pytest.mark.skipif(not SHIPPED, reason="the mini world's adapters are not trained yet")
def test_router_probe_reads_colour_but_not_shape_from_the_shipped_u_net():
    torch.set_num_threads(1)
    probe = router_inputs(load_pipeline("adapter"), count=48)
    assert probe.side == {0: 16, 1: 8, 2: 4, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16, 9: 16}
    eights = [block for block, side in probe.side.items() if side == 8]
    # measured at the 8 x 8 layers (blocks 1, 6, 7): colour 1.00 / 0.95 / 0.99, shape 0.18 / 0.42 / 0.30;
    # chance 0.17 and 0.2
    assert min(probe.colour[b] for b in eights) > 0.85
    assert max(probe.shape[b] for b in eights) < 0.6


@pytest.mark.skipif(not SHIPPED, reason="the mini world's adapters are not trained yet")
def test_position_probe_reads_every_block_and_finds_position_in_the_base():
    torch.set_num_threads(1)
    probe = position_probe(load_pipeline("adapter"), count=32, timesteps=(0, 700))
    assert probe.count == 32 and probe.side == {0: 16, 1: 8, 2: 4, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16, 9: 16}
    assert set(probe.r2) == {0, 700} and all(set(r) == set(probe.side) for r in probe.r2.values())
    # measured on the shipped base: 0.82 (32 and 96 scenes); the 8 x 8 decoder block knows where it is
    assert probe.r2[0][6] > 0.5
    # noise hides the subject from the first block: 0.29 at t = 0, 0.01 at t = 700 (32 scenes)
    assert probe.r2[700][0] < probe.r2[0][0]


@pytest.mark.skipif(not (WEIGHTS_DIR / "adapter_clip_only").exists(), reason="mini weights not shipped")
def test_pattern_visibility_reads_the_bits_the_vision_encoder_resolves_and_nothing_from_noise(monkeypatch):
    """The shipped 16 x 16 vision encoder resolves most pattern bits of held-out identities
    (0.90 measured with 1500 / 400 renders, as many as its input pixels give): a flaw of
    the world that this probe exists to show. Fed noise instead of CLIP states, the same
    probe reads chance."""
    torch.set_num_threads(1)
    pipe = load_pipeline("adapter_clip_only")
    visibility = pattern_visibility(pipe, train=600, held_out=200)
    assert visibility.bit_accuracy > 0.8
    # The encoder's own 16 x 16 input, and even 8 x 8, shows every cell as drawn (1.000
    # measured at 1500 / 400); only 4 x 4 pixels lose some (0.80). Read flip-invariantly,
    # as the states are, a linear map cannot undo the mirror images.
    assert visibility.pixel_image_bit_accuracy[8] > 0.95
    assert visibility.pixel_image_bit_accuracy[4] < visibility.pixel_image_bit_accuracy[8] - 0.08
    assert visibility.pixel_bit_accuracy[16] < visibility.pixel_image_bit_accuracy[16] - 0.05
    noise = torch.Generator().manual_seed(0)
    monkeypatch.setattr(pipe, "_clip_states", lambda subjects, device: torch.randn(len(subjects) + 1, 17, 64, generator=noise))
    assert abs(pattern_visibility(pipe, train=600, held_out=200).bit_accuracy - 0.5) < 0.08


def test_plain_bodies_keep_the_layout_and_erase_every_pattern():
    world = MiniWorld()
    for group in pair_groups(8):
        render = world.render(group.scenes[0])
        plain = plain_bodies(render)
        for placement, mask in zip(render.scene.placements, render.masks):
            assert (plain[mask] == palette(placement.identity.colour)[0]).all()
            assert not (render.image[mask] == plain[mask]).all()  # the pattern was there
        outside = ~render.masks.any(0)
        assert np.array_equal(plain[outside], render.image[outside])


def test_schedule_tail_is_the_sampling_schedule_from_its_step_on():
    full = build_sampling_scheduler()
    full.set_timesteps(SAMPLING["num_inference_steps"])
    tail = build_sampling_scheduler()
    tail.set_timesteps(sigmas=schedule_tail(6))
    assert torch.allclose(tail.sigmas, full.sigmas[6:])
    assert torch.allclose(tail.timesteps, full.timesteps[6:])
    assert schedule_tail(0)[-1] == 0.0 and len(schedule_tail(0)) == SAMPLING["num_inference_steps"] + 1


@pytest.mark.skipif(not SHIPPED, reason="mini weights not shipped")
def test_a_noised_plain_scene_holds_its_layout_through_sampling():
    """Sampled from step 6 of a plain-body scene, every subject comes out over its own
    mask. Started from pure noise, with the same masks routing the subjects, the base
    places them itself and misses about a third of the masks (0.69 measured)."""
    torch.set_num_threads(1)
    pipe, evaluator, world = load_pipeline(), MiniEvaluator.from_pretrained(), MiniWorld()
    pipe.set_progress_bar_config(disable=True)
    sigmas = schedule_tail(6)
    options = {k: v for k, v in SAMPLING.items() if k != "num_inference_steps"}
    owned = {"fixed": [], "free": []}
    for group in pair_groups(8):
        for index, (scene, candidates) in enumerate(zip(group.scenes, group.candidates)):
            render, masks = world.render(scene), true_layout(group, scene)
            generator = torch.Generator().manual_seed(index)
            starts = {"fixed": dict(latents=noised_start(pipe, plain_bodies(render), sigmas, generator), sigmas=sigmas),
                      "free": dict(generator=generator, num_inference_steps=SAMPLING["num_inference_steps"])}
            for cell, start in starts.items():
                image = pipe([scene.caption], subjects=group.subjects, subject_masks=masks, **options, **start).images
                regions = evaluator.read(uint8_images(image))[0].regions
                owned[cell] += [_owned_identity(regions, m, candidates) is not None for m in masks]
    assert np.mean(owned["fixed"]) >= 0.9
    assert np.mean(owned["fixed"]) >= np.mean(owned["free"]) + 0.15
