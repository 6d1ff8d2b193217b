"""The routing claim's privileged segmenter: what it is told, how it is scored (the
claim's own measure), the noise it reads (the sampler's), and that it learns."""

import numpy as np
import pytest
import torch

from anystory.mini import WEIGHTS_DIR, load_pipeline
from anystory.mini.claims import routing_scenes
from anystory.mini.models import build_sampling_scheduler
from anystory.mini.routing_bound import (
    CODE_DIM,
    PrivilegedSegmenter,
    Schedule,
    Scenes,
    layers_of_sides,
    owner_labels,
    routed_grids,
    score,
    subject_code,
    train_segmenter,
)
from anystory.mini.world import COLOURS, MAX_SUBJECTS, SHAPES, Identity, MiniWorld, mirror_pattern, pattern_bits

SHIPPED = (WEIGHTS_DIR / "base" / "model_index.json").exists()


def test_subject_code_tells_the_pattern_but_not_which_twin_the_caption_places_where():
    red_a, red_b, blue = Identity("heart", "red", 3), Identity("heart", "red", 5), Identity("circle", "blue", 3)
    cast, positions = [red_a, blue, red_b], ["left", "middle", "right"]
    codes = [subject_code(identity, cast, positions) for identity in cast]
    assert all(code.shape == (CODE_DIM,) for code in codes)
    thirds = [code[-3:].tolist() for code in codes]
    assert thirds == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]  # the caption names a red heart left and right
    pattern = slice(len(SHAPES) + len(COLOURS), len(SHAPES) + len(COLOURS) + 9)
    mirrored = slice(pattern.stop, pattern.stop + 9)
    assert (codes[0][pattern] != codes[2][pattern]).any()  # only the pattern tells the twins apart
    np.testing.assert_array_equal(codes[0][: pattern.start], codes[2][: pattern.start])
    np.testing.assert_array_equal(codes[0][pattern], pattern_bits(3))
    np.testing.assert_array_equal(codes[0][mirrored], pattern_bits(mirror_pattern(3)))


def test_owner_labels_give_each_cell_mostly_covered_by_a_subject_to_it():
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, :, :32] = True  # the left half
    masks[1, :8, 40:48] = True  # one 8 x 8 block: half of a 4 x 4 grid cell (16 px) in each direction
    labels = owner_labels(masks, 16)
    assert (labels[:, :8] == 0).all()
    assert (labels[:2, 10:12] == 1).all() and (labels == 1).sum() == 4
    assert (labels == MAX_SUBJECTS).sum() == 256 - 128 - 4
    assert (owner_labels(masks, 4)[:, :2] == 0).all() and (owner_labels(masks, 4) == 1).sum() == 0  # a quarter < 0.5


class _Told(torch.nn.Module):
    """A 'segmenter' that returns given labels as confident logits, whatever it reads."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.labels = labels

    def forward(self, noisy, timesteps, codes, counts):
        return torch.nn.functional.one_hot(self.labels, MAX_SUBJECTS + 1).permute(0, 3, 1, 2).float() * 20


def _scenes(count: int) -> Scenes:
    world = MiniWorld()
    renders = [world.render(group.scenes[0]) for group in routing_scenes(count)]
    labels = torch.stack([owner_labels(r.masks, 16) for r in renders])
    return Scenes(torch.zeros(count, 4, 16, 16), labels, torch.zeros(count, MAX_SUBJECTS, CODE_DIM),
                  torch.tensor([len(r.masks) for r in renders]), [torch.from_numpy(r.masks) for r in renders],
                  [False] * count)


def test_score_reads_exact_maps_as_one_at_their_grid_and_the_background_alone_as_zero():
    scenes = _scenes(6)
    schedule = Schedule(torch.ones(3), torch.zeros(3))  # the told maps ignore what they read
    exact = score(_Told(scenes.labels), scenes, schedule, grids=[16, 16])
    assert exact.mean == pytest.approx(1.0) and exact.per_step == pytest.approx([1.0] * len(schedule.sigmas))
    coarser = score(_Told(scenes.labels), scenes, schedule, grids=[16, 4])
    assert 0.5 < coarser.mean < 1.0  # a 4 x 4 grid blurs subjects of 17-28 px
    nothing = score(_Told(torch.full_like(scenes.labels, MAX_SUBJECTS)), scenes, schedule, grids=[16])
    assert nothing.mean == 0.0 and nothing.count == 6


def test_noise_is_the_samplers_add_noise_and_input_scaling_at_each_step():
    scheduler = build_sampling_scheduler()
    scheduler.set_timesteps(25)
    schedule = Schedule(scheduler.sigmas[:25].float(), scheduler.timesteps[:25].float())
    latents = torch.randn(2, 4, 16, 16)
    for step in (0, 12, 24):
        ours = schedule.noised(latents, torch.tensor([step, step]), torch.Generator().manual_seed(3))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
        timestep = scheduler.timesteps[step]
        scheduler._step_index = None
        theirs = scheduler.scale_model_input(scheduler.add_noise(latents, noise, timestep.reshape(1)), timestep)
        torch.testing.assert_close(ours, theirs)
    assert (schedule.sigmas.diff() < 0).all() and schedule.sigmas[0] > 10  # step 0 is almost all noise


@pytest.mark.skipif(not SHIPPED, reason="mini weights not shipped")
def test_routed_grids_are_the_claims_layer_grids_of_the_shipped_u_net():
    pipe = load_pipeline()
    assert routed_grids(pipe.unet, pipe.default_sample_size) == [16, 8, 4, 4, 4, 4, 8, 8, 16, 16]


def test_layers_of_sides_keeps_the_named_grids_in_order_and_names_a_side_no_layer_has():
    grids = [16, 8, 4, 4, 4, 4, 8, 8, 16, 16]
    assert layers_of_sides(grids, None) == grids
    assert layers_of_sides(grids, "16,8") == [16, 8, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="--sides 32.*4, 8, 16"):
        layers_of_sides(grids, "32")


def test_a_segmenter_learns_to_find_subjects_in_clean_latents():
    """Clean scenes (sigma ~ 0): a small segmenter beats its untrained self by far."""
    torch.manual_seed(0)
    world = MiniWorld()
    renders = [world.render(group.scenes[0]) for group in routing_scenes(48)]
    labels = torch.stack([owner_labels(r.masks, 16) for r in renders])
    # the latent: the image itself, average-pooled to 16 x 16 (no VAE needed to learn where colour is)
    latents = torch.stack([torch.nn.functional.avg_pool2d(torch.from_numpy(r.image).permute(2, 0, 1).float() / 127.5 - 1, 4)
                           for r in renders])
    codes = torch.zeros(48, MAX_SUBJECTS, CODE_DIM)
    for row, render in enumerate(renders):
        cast = [p.identity for p in render.scene.placements]
        for index, identity in enumerate(cast):
            codes[row, index] = torch.from_numpy(subject_code(identity, cast, [p.position for p in render.scene.placements]))
    scenes = Scenes(latents, labels, codes, torch.tensor([len(r.masks) for r in renders]),
                    [torch.from_numpy(r.masks) for r in renders], [False] * 48)
    clean = Schedule(torch.full((1,), 1e-3), torch.zeros(1))
    model = PrivilegedSegmenter(latent_channels=3, dim=16, channels=(16, 32, 32))
    before = score(model.eval(), scenes, clean, grids=[16]).mean
    losses = train_segmenter(model, scenes, clean, steps=150, batch_size=16, learning_rate=3e-3, log_every=0)
    after = score(model, scenes, clean, grids=[16]).mean
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    assert after > 0.5 and after > before + 0.3


def test_divided_schedule_halves_each_sigma_at_the_timestep_the_training_schedule_gives_it():
    scheduler = build_sampling_scheduler()
    scheduler.set_timesteps(25)
    schedule = Schedule(scheduler.sigmas[:25].float(), scheduler.timesteps[:25].float())
    same = schedule.divided(1, scheduler.alphas_cumprod)
    torch.testing.assert_close(same.sigmas, schedule.sigmas)
    torch.testing.assert_close(same.timesteps, schedule.timesteps, atol=1.0, rtol=0)  # Karras steps sit between integers
    half = schedule.divided(2, scheduler.alphas_cumprod)
    torch.testing.assert_close(half.sigmas * 2, schedule.sigmas)
    assert (half.timesteps < schedule.timesteps).all() and (half.timesteps[:-1] > half.timesteps[1:]).all()
