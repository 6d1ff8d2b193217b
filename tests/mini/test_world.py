"""The mini world: determinism, masks, captions and the held-out split."""

import numpy as np
import pytest
import torch

from anystory.mini.world import (
    BACKGROUNDS,
    HELD_OUT_PATTERNS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    Identity,
    MiniWorld,
    PairDataset,
    Placement,
    Scene,
    SceneDataset,
    ScenePairDataset,
    TextToImageDataset,
    canonical_pattern,
    check_target_sizes,
    distractors,
    identities,
    mirror_pattern,
    palette,
)

TRAINING_DATASETS = (TextToImageDataset, PairDataset, SceneDataset, ScenePairDataset)


@pytest.fixture(scope="module")
def world():
    return MiniWorld(seed=0)


def _renders(world, count=200, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        subjects = world.sample_identities(rng, int(rng.integers(1, 4)), twin_prob=0.3)
        yield world.render(world.sample_scene(rng, subjects))


@pytest.mark.parametrize("dataset_class", TRAINING_DATASETS)
def test_samples_are_a_function_of_the_seeds(world, dataset_class):
    first, again = dataset_class(world, seed=3)[17], dataset_class(MiniWorld(seed=0), seed=3)[17]
    other = dataset_class(world, seed=4)[17]
    assert first["caption"] == again["caption"]
    assert torch.equal(first["image"], again["image"])
    assert not torch.equal(first["image"], other["image"])


def test_world_seed_changes_textures_not_the_split(world):
    scene = Scene("forest", 0, False, 0, ())
    assert not np.array_equal(world.background(scene), MiniWorld(seed=1).background(scene))
    assert identities("held_out") == MiniWorld(seed=1)._identities["held_out"]


def test_masks_match_rendered_pixels(world):
    for render in _renders(world):
        union = render.masks.any(0)
        outside = ~union
        assert np.array_equal(render.image[outside], world.background(render.scene)[outside])
        assert render.masks.sum(0).max() <= 1, "subjects overlap"
        for mask, placement in zip(render.masks, render.scene.placements):
            assert mask.sum() > 100
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            colours = palette(placement.identity.colour)
            pixels = render.image[mask]
            assert (pixels[:, None, :] == colours[None]).all(-1).any(-1).all()


def test_every_pattern_cell_is_visible_at_the_smallest_size(world):
    """Light cells of a one-hot pattern must show up for every shape at the smallest
    two-subject size, each covering at least 12 pixels (about a 3.5 px square)."""
    for shape in SHAPES:
        for bit in range(9):
            identity = Identity(shape, "blue", canonical_pattern(1 << bit))
            placement = Placement(identity, 32.0, 32.0, 22.0, flipped=identity.pattern != 1 << bit)
            render = world.render(Scene("night", 0, False, 0, (placement,)))
            light = (render.image == palette("blue")[1]).all(-1)
            assert light.sum() >= 12, (shape, bit)


def test_flipped_subject_shows_the_mirrored_pattern(world):
    identity = Identity("square", "red", canonical_pattern(0b000000111))
    plain, flipped = (
        world.render(Scene("snow", 0, False, 0, (Placement(identity, 32.0, 32.0, 30.0, flipped=f),)))
        for f in (False, True)
    )
    mask = flipped.masks[0]
    assert np.array_equal(mask, plain.masks[0][:, ::-1])  # centred at x = 32: pixel x <-> 63 - x
    assert np.array_equal(flipped.image[mask], plain.image[:, ::-1][mask])


def test_body_frame_undoes_position_size_rotation_and_flip():
    identity = Identity("square", "red", canonical_pattern(0b000000111))
    plain = Placement(identity, 30.0, 20.0, 10.0)
    assert np.allclose(plain.body_frame(np.array(35.0), np.array(20.0)), (1.0, 0.0))  # right edge
    flipped = Placement(identity, 30.0, 20.0, 10.0, flipped=True)
    assert np.allclose(flipped.body_frame(np.array(35.0), np.array(20.0)), (-1.0, 0.0))
    assert np.allclose(flipped.body_frame(np.array(35.0), np.array(20.0), unflip=False), (1.0, 0.0))
    turned = Placement(identity, 30.0, 20.0, 10.0, angle=90.0)  # the subject's +u now points down
    assert np.allclose(turned.body_frame(np.array(30.0), np.array(25.0)), (1.0, 0.0))


@pytest.mark.parametrize("dataset_class", TRAINING_DATASETS)
def test_held_out_identities_never_appear_in_training_samples(world, dataset_class):
    train, held_out = dataset_class(world), dataset_class(world, split="held_out")
    for i in range(150):
        assert not any(Identity.from_name(n).held_out for n in train[i]["identities"].split("|"))
        assert all(Identity.from_name(n).held_out for n in held_out[i]["identities"].split("|"))


def test_held_out_split_is_closed_under_flips():
    assert HELD_OUT_PATTERNS, "no held-out patterns"
    for pattern in range(512):
        assert (canonical_pattern(pattern) in HELD_OUT_PATTERNS) == (
            canonical_pattern(mirror_pattern(pattern)) in HELD_OUT_PATTERNS
        )
    assert len(identities("held_out")) >= 5 * 30  # target + 4 distractors per attribute pair


def test_distractors_share_captioned_attributes_and_split(world):
    rng = np.random.default_rng(0)
    for identity in identities("held_out")[::97]:
        others = distractors(identity, 4, rng)
        assert len(set(others)) == 4 and identity not in others
        assert all((o.shape, o.colour, o.held_out) == (identity.shape, identity.colour, True) for o in others)


def test_captions_name_each_subject_where_it_is(world):
    for render in _renders(world):
        *parts, background = render.caption.split("; ")
        assert background == f"{render.scene.background} background"
        assert background.split()[0] in BACKGROUNDS
        assert len(parts) == len(render.masks)
        centres = [np.nonzero(m)[1].mean() + 0.5 for m in render.masks]
        assert centres == sorted(centres), "subjects are captioned left to right"
        for part, mask, placement in zip(parts, render.masks, render.scene.placements):
            where, what = part.split(", ")
            assert where.split()[-1] == POSITIONS[int((np.nonzero(mask)[1].mean() + 0.5) * 3 // IMAGE_SIZE)]
            assert what == f"a {placement.identity.colour} {placement.identity.shape}"


def test_scenes_hold_same_attribute_twins(world):
    data = SceneDataset(world)
    twins = 0
    for i in range(100):
        names = [Identity.from_name(n) for n in data[i]["identities"].split("|")]
        pairs = {(n.shape, n.colour) for n in names}
        twins += len(pairs) < len(names)
        assert len(set(names)) == len(names), "a scene repeats an identity"
    assert 30 <= twins <= 70


def test_pairs_show_one_identity_in_two_contexts(world):
    sample = PairDataset(world)[5]
    assert sample["reference_mask"].sum() > 100 and sample["mask"].sum() > 100
    assert not torch.equal(sample["reference"], sample["image"])


def test_a_lone_subject_can_take_the_sizes_of_a_crowded_scene(world):
    rng = np.random.default_rng(3)
    identity = world.sample_identity(rng)
    for sizes_of, (low, high) in ((1, (26, 36)), (2, (22, 28)), (3, (17, 20))):
        sizes = [world.sample_scene(rng, [identity], sizes_of=sizes_of).placements[0].size for _ in range(20)]
        assert low <= min(sizes) and max(sizes) <= high
    with pytest.raises(ValueError, match="sizes_of"):
        world.sample_scene(rng, [identity], sizes_of=4)


def test_pair_targets_default_to_lone_sizes_drawn_as_the_shipped_set_was(world):
    """The default draws no size: its samples are the stream the shipped stage 1 trained on."""
    data = PairDataset(world, seed=11)
    rng = data.rng(7)
    identity = world.sample_identity(rng, "train")
    world.sample_scene(rng, [identity])  # the reference
    target = world.render(world.sample_scene(rng, [identity]))
    assert torch.equal(data[7]["mask"], torch.from_numpy(target.masks).float())


def test_pair_targets_can_be_drawn_at_the_sizes_of_pairs_and_trios(world):
    lone, trio = PairDataset(world, seed=11), PairDataset(world, seed=11, target_sizes=(0, 0, 1))
    for i in range(12):
        small, sample = trio[i], lone[i]
        assert small["identities"] == sample["identities"]  # the same pair, its target smaller
        assert small["mask"].sum() < 0.6 * sample["reference_mask"].sum()
    with pytest.raises(ValueError, match="target_sizes"):
        check_target_sizes((0.5, 0.5))
    with pytest.raises(ValueError, match="target_sizes"):
        PairDataset(world, target_sizes=(0.6, 0.6, 0.0))


def test_scene_pairs_reference_each_subject_alone_elsewhere_in_mask_order(world):
    """Reference k shows the target's k-th subject (masks run left to right) in a context
    of its own: the same body colours and a pattern of the same identity, a new background."""
    data = ScenePairDataset(world)
    counts = []
    for i in range(40):
        sample = data[i]
        count = sample["num_subjects"]
        counts.append(count)
        names = sample["identities"].split("|")
        assert len(names) == count and sample["masks"][count:].sum() == 0 and sample["reference_masks"][count:].sum() == 0
        for k, name in enumerate(names):
            identity = Identity.from_name(name)
            reference = sample["references"][k].permute(1, 2, 0).add(1).mul(127.5).round().numpy()
            body = sample["reference_masks"][k].numpy() > 0.5
            colours = {tuple(c) for c in reference[body].astype(int)}
            assert colours <= {tuple(c) for c in palette(identity.colour).astype(int)}, name
            target = sample["image"].permute(1, 2, 0).add(1).mul(127.5).round().numpy()
            on_target = sample["masks"][k].numpy() > 0.5
            assert {tuple(c) for c in target[on_target].astype(int)} <= {tuple(c) for c in palette(identity.colour).astype(int)}
        assert not torch.equal(sample["references"][0], sample["image"])
    assert set(counts) == {1, 2, 3}
