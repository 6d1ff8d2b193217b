"""The claims evaluation: its arithmetic on constructed cases, and a small fixed sample of
every claim on the shipped weights (the CI regression test of issue 4)."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anystory.cli import main
from anystory.mini import WEIGHTS_DIR
from anystory.mini.claims import (
    ceiling_ious,
    grid_ious,
    has_twins,
    layer_grid_iou,
    detail_fidelity,
    hard_map_ious,
    identity_correct,
    judge_pair,
    mask_iou,
    no_blending,
    attributes_correct,
    pair_groups,
    positions_correct,
    routing_scenes,
    run_claims,
    single_subject_groups,
    text_alignment,
)
from anystory.mini.diagnostics import layout_readings, read_sides, side_readings
from anystory.mini.evaluator import MiniEvaluator, RegionReading
from anystory.mini.world import CANONICAL_PATTERNS, Identity, MiniWorld, pattern_bits
from anystory.pipelines import RoutingMaps

SHIPPED = all((WEIGHTS_DIR / folder / name).exists() for folder, name in
              (("base", "model_index.json"), ("adapter", "config.json"), ("adapter_clip_only", "config.json")))


@pytest.fixture(scope="module")
def evaluator():
    torch.set_num_threads(1)
    return MiniEvaluator.from_pretrained()


def _masks_as_maps(masks: np.ndarray) -> torch.Tensor:
    """(B, N, H, W) instance masks -> (B, N+1, H, W) one-hot routing maps, background last."""
    subjects = torch.from_numpy(masks).float()
    return torch.cat([subjects, 1 - subjects.sum(1, keepdim=True)], 1)


class Oracle:
    """Stands in for a pipeline: draws exactly the captioned ground-truth scenes of the
    given groups, and routes every subject to its true mask."""

    def __init__(self, groups):
        world = MiniWorld()
        self.renders = {tuple(g.prompts): [world.render(s) for s in g.scenes] for g in groups}

    def __call__(self, prompts, return_routing_maps=False, **kwargs):
        renders = self.renders[tuple(prompts)]
        maps = _masks_as_maps(np.stack([r.masks for r in renders]))[None]
        return SimpleNamespace(images=np.stack([r.image for r in renders]) / 255.0,
                               routing_maps=RoutingMaps([maps], [maps]) if return_routing_maps else None)


def _region(identity: Identity, left: int, width: int = 12, position: str = "left") -> RegionReading:
    """A hand-made reading: a confident read of `identity`'s pattern in columns left..left+width."""
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:32, left:left + width] = True
    logits = 8.0 * (2.0 * pattern_bits(identity.pattern) - 1)
    return RegionReading(mask, position, identity.shape, identity.colour, logits)


# --------------------------------------------------------------------------- cases


def test_cases_are_held_out_deterministic_and_distractors_share_the_captioned_attributes():
    singles, pairs = single_subject_groups(10), pair_groups(6)
    assert sum(len(g.scenes) for g in singles) == 10 and sum(len(g.scenes) for g in pairs) == 6
    assert [g.prompts for g in single_subject_groups(10)] == [g.prompts for g in singles]
    for group in singles:
        (truth,) = group.identities
        assert truth.held_out
        for scene, candidates in zip(group.scenes, group.candidates):
            assert scene.background != group.references[0].scene.background  # another context
            assert len(candidates) == 5 and truth in candidates and len(set(candidates)) == 5
            assert {(c.shape, c.colour) for c in candidates} == {(truth.shape, truth.colour)}
    for group in pairs:
        a, b = group.identities
        assert a.held_out and b.held_out and (a.shape, a.colour) == (b.shape, b.colour) and a != b
        assert all(s.caption.startswith(f"on the left, {a.phrase}; on the right, {b.phrase};") for s in group.scenes)
        assert all(a in c and b in c and len(set(c)) == 5 for c in group.candidates)
    for group in routing_scenes(6):
        assert 2 <= len(group.identities) <= 3
        assert group.identities == [p.identity for p in group.scenes[0].placements]


# --------------------------------------------------------------------------- metric arithmetic


def test_identity_is_the_largest_region_recognised_among_the_candidates():
    truth, other = (Identity("heart", "red", CANONICAL_PATTERNS[i]) for i in (5, 12))
    candidates = [other, truth]
    assert identity_correct([_region(other, 2, width=6), _region(truth, 30)], candidates, truth)
    assert not identity_correct([_region(other, 30), _region(truth, 2, width=6)], candidates, truth)
    assert not identity_correct([], candidates, truth)


def test_blending_definition_on_hand_made_readings():
    a, b, c = (Identity("cross", "blue", CANONICAL_PATTERNS[i]) for i in (5, 12, 33))
    candidates, pair = [c, b, a], [a, b]
    verdict = judge_pair([_region(b, 2), _region(a, 40)], candidates, pair)
    assert (verdict.two_regions, verdict.both_correct, verdict.blended) == (True, True, False)
    verdict = judge_pair([_region(a, 2), _region(a, 40)], candidates, pair)  # one twin drawn twice
    assert (verdict.both_correct, verdict.blended) == (False, True)
    verdict = judge_pair([_region(a, 2), _region(c, 40)], candidates, pair)  # a twin lost, no leak
    assert (verdict.both_correct, verdict.blended) == (False, False)
    verdict = judge_pair([_region(a, 2)], candidates, pair)
    assert (verdict.two_regions, verdict.both_correct, verdict.blended) == (False, False, False)
    verdict = judge_pair([_region(a, 2), _region(b, 40), _region(a, 20, width=3)], candidates, pair)
    assert verdict.both_correct and not verdict.blended  # a small third region does not count


def test_iou_of_ground_truth_maps_is_one_and_of_shifted_maps_is_known():
    scenes = [group.scenes[0] for group in routing_scenes(6)]
    render = MiniWorld().render(next(scene for scene in scenes if len(scene.placements) == 2))
    maps = _masks_as_maps(render.masks[None])[None]  # (1 step, 1 image, N+1, H, W)
    routing = RoutingMaps([maps], [maps])
    assert hard_map_ious(routing, render.masks, "refined") == [1.0] * len(render.masks)
    assert ceiling_ious(routing, render.masks) == [1.0] * len(render.masks)
    coarse = RoutingMaps([torch.zeros(1, 1, maps.shape[2], 4, 4)], [])  # one 4 x 4 layer: only its size counts
    assert all(0.0 < iou < 0.9 for iou in ceiling_ious(coarse, render.masks))
    # at each layer's own grid, perfect routing scores exactly 1, however coarse the layer
    one_hot = _masks_as_maps(render.masks[None]).float()
    perfect = [F.interpolate(one_hot, size=(g, g), mode="area")[None] for g in (16, 8, 4)]
    assert layer_grid_iou(RoutingMaps(perfect, perfect), render.masks, "refined") == 1.0
    # the two subjects swapped at the finest of three layers: it scores 0, the mean 2/3
    swapped = [perfect[0][:, :, [1, 0, *range(2, one_hot.shape[1])]], *perfect[1:]]
    assert layer_grid_iou(RoutingMaps(swapped, perfect), render.masks, "refined") == pytest.approx(2 / 3)
    assert layer_grid_iou(RoutingMaps(swapped, perfect), render.masks, "coarse") == 1.0
    # per grid size, the swap shows at 16 x 16 alone, and only in the refined maps
    assert grid_ious(RoutingMaps(refined=swapped, coarse=perfect), render.masks) == {"16 x 16": 0.0, "8 x 8": 1.0, "4 x 4": 1.0}
    square = np.zeros((64, 64), dtype=bool)
    square[0:10, 0:10] = True
    assert mask_iou(square, np.roll(square, 5, axis=1)) == pytest.approx(50 / 150)
    assert mask_iou(square, ~square) == 0.0 and mask_iou(~np.ones_like(square), ~np.ones_like(square)) == 0.0


def test_twin_scenes_are_those_with_a_shared_shape_and_colour():
    a, b = pair_groups(1)[0].identities
    assert has_twins([a, b]) and not has_twins([a, Identity("heart" if a.shape != "heart" else "star", a.colour, a.pattern)])
    assert sum(has_twins(g.identities) for g in routing_scenes(40)) in range(10, 31)  # about half


def test_positions_must_match_the_caption_left_to_right():
    (group,) = pair_groups(1)
    scene = group.scenes[0]
    regions = [_region(group.identities[0], 4, position="left"), _region(group.identities[1], 48, position="right")]
    assert positions_correct(regions, scene)
    assert not positions_correct(regions[:1], scene) and not positions_correct(regions[::-1], scene)


def test_attributes_must_match_the_caption_left_to_right():
    (group,) = pair_groups(1, twins=False)
    scene, (a, b) = group.scenes[0], group.identities
    assert (a.shape, a.colour) != (b.shape, b.colour)
    assert attributes_correct([_region(a, 4), _region(b, 48)], scene)
    assert not attributes_correct([_region(b, 4), _region(a, 48)], scene)  # swapped sides
    assert not attributes_correct([_region(a, 4)], scene)  # a subject missing
    recoloured = Identity(b.shape, next(c for c in ("red", "blue") if c != b.colour), b.pattern)
    assert not attributes_correct([_region(a, 4), _region(recoloured, 48)], scene)


def test_ground_truth_drawn_by_an_oracle_scores_as_perfect(evaluator, tmp_path):
    fidelity = detail_fidelity({name: Oracle(single_subject_groups(8)) for name in ("adapter", "adapter_clip_only")},
                               evaluator, count=8, sheet=tmp_path / "fidelity.png")
    assert min(fidelity.accuracy.values()) >= 0.85 and min(fidelity.found.values()) == 1.0
    blending = no_blending(Oracle(pair_groups(8)), evaluator, count=8, sheet=tmp_path / "blending.png")
    assert min(blending.both_correct.values()) >= 0.85 and max(blending.blending.values()) == 0.0
    oracle = Oracle(single_subject_groups(4, stream="text") + pair_groups(4, stream="text_pairs", twins=False))
    text = text_alignment(oracle, evaluator, count=8, sheet=tmp_path / "text.png")
    assert min(text.background.values()) == 1.0 and min(text.position.values()) >= 0.85
    assert min(text.attributes.values()) >= 0.85
    base_only = text_alignment(oracle, evaluator, count=8, cells=("base",))  # a plain pipeline, no subjects
    assert set(base_only.attributes) == {"base"} and base_only.attributes["base"] == text.attributes["base"]
    assert all((tmp_path / f"{claim}.png").exists() for claim in ("fidelity", "blending", "text"))


def test_sides_are_read_left_to_right_against_the_caption_order():
    a, b = Identity("heart", "red", CANONICAL_PATTERNS[5]), Identity("circle", "blue", CANONICAL_PATTERNS[12])
    candidates = [Identity("heart", "red", CANONICAL_PATTERNS[33]), b, a]
    in_place = read_sides([_region(b, 40), _region(a, 2)], candidates, [a, b])  # listed right first
    assert in_place == [(True, True), (True, True)]
    swapped = read_sides([_region(b, 2), _region(a, 40)], candidates, [a, b])
    assert swapped == [(False, False), (False, False)]
    assert read_sides([_region(a, 2)], candidates, [a, b]) == []


def test_side_readings_of_ground_truth_are_perfect(evaluator):
    readings = side_readings(Oracle(pair_groups(6, twins=False)), evaluator, count=6)
    assert set(readings.two_regions) == {"router", "no_router", "base"}
    assert min(readings.two_regions.values()) == 1.0 and min(readings.attributes.values()) == 1.0
    assert min(readings.identity.values()) >= 0.85


class LayoutOracle:
    """Stands in for a pipeline on single-prompt calls: given the scene's true masks in the
    order of its subjects it draws the ground truth; routing on its own it blends, drawing
    the first subject's identity in every place."""

    def __init__(self, groups):
        self.world = MiniWorld()
        self.scenes = {s.caption: s for g in groups for s in g.scenes}

    def __call__(self, prompts, subjects, subject_masks=None, return_routing_maps=False, **kwargs):
        (scene,) = [self.scenes[p] for p in prompts]
        render = self.world.render(scene)
        if subject_masks is None:
            first = next(p.identity for p in scene.placements if p.identity.name == subjects[0].name)
            scene = replace(scene, placements=tuple(replace(p, identity=first) for p in scene.placements))
        else:
            owners = [next(i for i, m in enumerate(render.masks) if np.array_equal(m, mask)) for mask in subject_masks]
            assert [scene.placements[i].identity.name for i in owners] == [s.name for s in subjects]
        maps = RoutingMaps([], []) if return_routing_maps else None  # recorded nothing
        return SimpleNamespace(images=self.world.render(scene).image[None] / 255.0, routing_maps=maps)


def test_layout_probe_passes_each_scene_its_true_masks_in_reference_order(evaluator):
    readings = layout_readings(LayoutOracle(pair_groups(6)), evaluator, count=6)
    assert readings.both_correct["true_masks"] >= 5 / 6 and readings.blending["true_masks"] <= 1 / 6
    assert readings.both_correct["router"] == 0.0 and readings.blending["router"] == 1.0


def test_cli_refuses_unknown_claims(capsys):
    assert main(["mini", "evaluate", "--claims", "fidelity,speed"]) == 2
    assert "--claims takes" in capsys.readouterr().err


# --------------------------------------------------------------------------- shipped weights


@pytest.mark.skipif(not SHIPPED, reason=f"the mini world's trained weights are not in {WEIGHTS_DIR} yet "
                    "(base/, adapter/, adapter_clip_only/: `python -m anystory.mini.recipe --phase all`)")
def test_shipped_weights_clear_the_regression_thresholds(tmp_path):
    """16 fixed generations (scenes for routing) per cell. Thresholds sit a clear margin
    below what the shipped weights (base 12675 steps, stage 1 28000, stage 2 2500 and
    its router context 2500, sampling settings calibrated: references dropped from CFG's
    unconditional branch, gamma 0) measured on this sample, shown in each comment; they guard against
    regressions, not the paper's targets (see claims.md)."""
    torch.set_num_threads(1)
    results = {claim: entry["result"] for claim, entry in run_claims(count=16, out=tmp_path, log=lambda _: None).items()}
    fidelity, blending, routing, text = (results[c] for c in ("fidelity", "blending", "routing", "text"))
    assert fidelity["found"]["adapter"] >= 0.9  # 1.0
    assert fidelity["accuracy"]["adapter"] >= 0.6  # 0.875 (0.80 on 200); chance is 0.2
    assert fidelity["accuracy"]["adapter"] > fidelity["accuracy"]["clip_only"]  # 0.875 vs 0.5625
    assert blending["two_regions"]["router"] >= 0.7  # 0.875
    # the router keeps the twins apart as two subjects (0.795 vs 0.555 on 200), though not yet as the right two
    assert blending["two_regions"]["router"] > blending["two_regions"]["no_router"] + 0.1  # 0.875 vs 0.5
    assert blending["blending"]["router"] <= 0.35  # 0.125 (0.12 on 200)
    # 0.386 vs 0.050 at the layer grids; the router without its context read 0.334 here
    assert routing["refined"] >= 0.34 and routing["refined"] > routing["coarse"] + 0.15
    assert routing["image_refined"] >= 0.25 and 0.65 <= routing["image_ceiling"] <= 0.8  # 0.314, 0.741
    assert routing["refined_per_step"][-1] > routing["refined_per_step"][0] + 0.3  # 0.494 vs 0.026: found as noise clears
    assert min(text["background"].values()) >= 0.85  # 1.0 and 1.0
    assert text["position"]["personalized"] >= 0.75 and text["position"]["base"] >= 0.8  # 0.9375 and 1.0
    assert all((tmp_path / name).exists() for name in ("claims.json", "claims.md", "fidelity.png", "routing.png"))
