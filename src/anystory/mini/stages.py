"""AnyStory's two training stages on the mini world, with the project's own `Trainer`.

The very code path a researcher runs on SDXL (`anystory.training.Trainer`), fed with
the world's samples as `Record`s and started from the bundled base models:

- stage1: the subject encoder on pairs (one identity in two contexts);
- stage1_clip_only: the same without a ReferenceNet (the paper's CLIP-only ablation);
- stage2: the router on 2-3 subject scenes, starting from the stage-1 adapter;
- stage2_context: the `router_context` deviation on top of stage 2's router, its
  convolutions alone trained on the same scenes (single-subject routing stays stage 2's).

A stage-1 phase run with the override `train.layout_routing=true` trains on scenes of 1-3
subjects (`ScenePairRecords`), each routed to its own mask: an experiment, not part of
the recipe (see the comment above `STAGE_SETTINGS`).

Each writes `out/<phase>/adapter`; checkpoints make every phase resumable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..training import Record, Trainer
from ..training.config import apply_override, config_from_dict
from .world import (
    IMAGE_SIZE, LONE_SIZES, Identity, MiniWorld, PairDataset, SceneDataset, ScenePairDataset, WorldDataset,
)

BASE_WEIGHTS = Path(__file__).parent / "weights" / "base"
SOURCE_LENGTH = 200_000  # samples per epoch; each is rendered on demand
# The adapter in miniature: every part the paper has, sized to the 4 M-parameter U-Net.
# routing_from_reference (a deviation, see `AnyStoryAdapter`): the world's twins differ
# only in a pattern its CLIP cannot see (their CLIP routing features: cosine 0.997).
# reference_size is half the image side, as the paper's 512 px references are for
# 1024 px images: a subject then spans about as many tokens in the ReferenceNet as in
# the U-Net at the same layer, so its cells can be matched without a change of scale.
# Measured (stage 1, 1000 steps, batch 16, same base and seed, `reference_query` on):
# reference gain at t = 500 / 700 of 0.74 / 1.08 % with 64 px references, 1.30 / 2.23 %
# with 32 px, and 25 % less time per step (`anystory.mini.diagnostics`).
# reference_query (a deviation, see `AnyStoryAdapter`): a trainable query for the
# reference keys. Measured the same way with 64 px references: 0.32 / 1.01 % after 2000
# steps with the paper's shared query, 0.74 / 1.08 % after 1000 and 0.93 / 1.68 % after
# 3000 with its own.
ADAPTER_KWARGS = dict(
    image_embed_dim=64, num_subject_tokens=16, qformer_dim=64, qformer_depth=4, qformer_heads=4,
    routing_dim=64, router_dim=32, router_heads=2, reference_size=IMAGE_SIZE // 2, max_subjects=4,
    routing_from_reference=True, reference_query=True,
)
# The learning rate is 2x the paper's 1e-4: runs here are thousands of steps, not the
# paper's length. (A stage 1 at 6e-4 matched the shipped 28000-step fidelity in 14000
# steps on the shipped base, but on the shorter recipe's base its whole set read fidelity
# 0.740 after 14000 and 0.760 after 18000; after 24000, the last 6000 annealed, 0.815 but
# with the position in personalized images at 0.880 < 0.90: the recipe keeps 2e-4 x 28000;
# notebook, "The shorter recipe".)
# Stage 1 weights the loss 10x on subject pixels (a deviation): a single
# subject covers ~13 % of the latent and its pattern far less, and with the plain mean
# 1300 more steps left the reference's effect on the subject's noise error at ~0.1 %.
# Stage 1 also draws timesteps from [300, 1000) only (a deviation; the paper samples all):
# below t = 300 the pattern is already fixed by the noisy latent itself, so those steps
# teach no copying. At 1000 steps this lifted the gain at t = 500 / 700 from 1.43 / 2.01 %
# to 1.68 / 2.36 % on the same base.
# Stage 1 runs 28000 steps (about 4.5 h on one thread): its copying was still improving
# at 21000 (held-out identity accuracy 0.69 at 14000 steps, 0.79 at 20400, sampled as
# calibrated; docs/mini-world-training.md); the CLIP-only ablation, which has nothing to
# copy with, 7000. Stage 2 runs 2500 (on a 7000-step stage 1: routing IoU 0.326 at 1000,
# 0.348 at 2500).
# Stage 2 lets twins trade ground-truth masks in the routing loss (`train.match_twins`,
# a deviation: see `anystory.models.routed_attention.routing_loss`).
# `train.layout_routing` (a deviation, see `AnyStoryObjective._teacher_layout`) is not in
# the recipe: the paper's stage 1 only ever sees one subject, routed everywhere, and stage 2
# freezes the encoder, so in two-subject scenes it copies poorly even where the routing is
# perfect. 1500 steps of it on the shipped 28000-step encoder (`--phase stage1 --init
# ADAPTER train.layout_routing=true`) lifted both twins right with their true masks as the
# layout from 0.0875 to 0.225 (`python -m anystory.mini.diagnostics --probe layout`, 80
# held-out twin prompts), and with 2000 more stage-2 steps on top, both correct from 0.075
# to 0.130 (200 held-out prompts); but single-subject fidelity fell from 0.800 to 0.680,
# blending rose from 0.170 to 0.240 and routing IoU fell from 0.323 to 0.259, so it does not ship.
# Mixes with 0.7 of the targets alone (0.2 or 0.3 with two subjects, 0.1 or none with three)
# cost fidelity as much (0.700-0.735 after 1500-3000 steps), and so does the 0.7 / 0.3 mix
# from a fresh adapter (0.760 after 14000 steps at 6e-4; docs/mini-world-training.md).
# `router_context` (a deviation, see `anystory.models.router.LatentContext`) is its own
# phase, stage2_context, on top of stage 2's trained router, its convolutions trained alone
# and used only where two or more subjects are routed: 2500 stage-2 steps with 2 of them
# from a fresh router raised routing IoU from 0.323 to 0.375 and twins both correct from
# 0.075 to 0.200, but single-subject fidelity fell from 0.800 to 0.745 (0.755 when the
# router's own weights trained on with the context skipped for one subject). On top, alone:
# 0.364 and 0.185, blending 0.170 -> 0.120, fidelity 0.800 (docs/mini-world-training.md).
STAGE_SETTINGS = {
    "stage1": dict(stage=1, batch_size=16, max_steps=28000, learning_rate=2e-4, subject_loss_weight=9.0,
                   match_twins=False, timestep_range=(300, 1000), starts_from=None, add_router_context=0),
    "stage1_clip_only": dict(stage=1, batch_size=16, max_steps=7000, learning_rate=2e-4, subject_loss_weight=9.0,
                   match_twins=False, timestep_range=(300, 1000), starts_from=None, add_router_context=0),
    "stage2": dict(stage=2, batch_size=16, max_steps=2500, learning_rate=2e-4, subject_loss_weight=0.0,
                   match_twins=True, timestep_range=None, starts_from="stage1", add_router_context=0),
    "stage2_context": dict(stage=2, batch_size=16, max_steps=2500, learning_rate=2e-4, subject_loss_weight=0.0,
                   match_twins=True, timestep_range=None, starts_from="stage2", add_router_context=2),
}


def _image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(((array.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))


class PairRecords:
    """Stage-1 records: the target scene and its subject, referenced from another context."""

    def __init__(self, split: str = "train", seed: int = 11, length: int = SOURCE_LENGTH,
                 target_sizes: tuple[float, ...] = LONE_SIZES):
        self.data: WorldDataset = PairDataset(MiniWorld(), split=split, seed=seed, length=length,
                                              target_sizes=target_sizes)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Record:
        s = self.data[index]
        return Record(
            image=_image(s["image"]), caption=s["caption"], masks=[s["mask"][0].numpy() > 0.5],
            references=[(_image(s["reference"]), s["reference_mask"][0].numpy() > 0.5)], key=f"pair{index}",
        )


class SceneRecords(PairRecords):
    """Stage-2 records: multi-subject scenes; references are cut from the scene itself."""

    def __init__(self, split: str = "train", seed: int = 12, length: int = SOURCE_LENGTH):
        self.data = SceneDataset(MiniWorld(), split=split, seed=seed, length=length)

    def __getitem__(self, index: int) -> Record:
        s = self.data[index]
        masks = [m.numpy() > 0.5 for m in s["masks"][: s["num_subjects"]]]
        phrases = [Identity.from_name(name).phrase for name in s["identities"].split("|")]
        groups = [phrases.index(phrase) for phrase in phrases]  # twins: same shape and colour
        return Record(image=_image(s["image"]), caption=s["caption"], masks=masks, key=f"scene{index}",
                      references=self._references(s), subject_groups=groups)

    def _references(self, sample: dict) -> list | None:
        return None  # cut from the target by the Trainer


class ScenePairRecords(SceneRecords):
    """Stage-1 records of the `layout_routing` deviation: scenes of 1-3 subjects, each
    subject referenced from a context of its own."""

    def __init__(self, split: str = "train", seed: int = 13, length: int = SOURCE_LENGTH):
        self.data = ScenePairDataset(MiniWorld(), split=split, seed=seed, length=length)

    def _references(self, sample: dict) -> list:
        count = sample["num_subjects"]
        return [(_image(image), mask.numpy() > 0.5)
                for image, mask in zip(sample["references"][:count], sample["reference_masks"][:count])]


def stage_config(phase: str, out: Path, base: Path = BASE_WEIGHTS, steps: int | None = None,
                 init_adapter: Path | None = None) -> dict:
    """The Trainer config of one phase. Stage 2 starts from stage 1's adapter; stage 1 from
    a fresh one, or from `init_adapter` (to continue training shipped weights)."""
    settings = STAGE_SETTINGS[phase]
    clip_only = phase == "stage1_clip_only"
    adapter_kwargs = dict(ADAPTER_KWARGS, use_reference_net=not clip_only)
    for option in ("routing_from_reference", "reference_query"):  # both act on the ReferenceNet
        adapter_kwargs[option] &= not clip_only
    start = out / settings["starts_from"] / "adapter" if settings["starts_from"] else init_adapter
    return {
        "model": {
            "base": str(base), "image_encoder": str(base / "image_encoder"),
            "adapter": str(start) if start else None,
            "adapter_kwargs": adapter_kwargs, "add_router_context": settings["add_router_context"],
        },
        "data": {"resolution": IMAGE_SIZE, "bucketing": False, "random_crop": False, "max_subjects": 3},
        "train": {
            "batch_size": settings["batch_size"], "max_steps": steps or settings["max_steps"],
            "learning_rate": settings["learning_rate"], "lr_warmup_steps": 100, "lr_scheduler": "constant_with_warmup",
            "subject_loss_weight": settings["subject_loss_weight"], "match_twins": settings["match_twins"],
            "timestep_range": settings["timestep_range"], "router_context_only": settings["add_router_context"] > 0,
            "seed": 0,
        },
        "output": {
            "dir": str(out / phase), "checkpoint_every": 100, "checkpoints_total_limit": 2, "log_every": 25,
            "report_to": "none", "validation_every": 0,
        },
    }


def train_stage(phase: str, out: Path, base: Path = BASE_WEIGHTS, steps: int | None = None,
                init_adapter: Path | None = None, overrides: list[str] | None = None,
                target_sizes: tuple[float, ...] = LONE_SIZES) -> Path:
    """Run (or resume) one AnyStory stage; returns the exported adapter folder and writes
    the phase's report (its step budget and this run's wall-clock minutes). `overrides`
    are the Trainer config's `section.key=value` (for ablations of the recipe);
    `target_sizes` is stage 1's `PairDataset.target_sizes` (its pairs' target sizes)."""
    raw = stage_config(phase, out, base, steps, init_adapter)
    for override in overrides or []:
        apply_override(raw, override)
    config = config_from_dict(raw)
    source = _records(STAGE_SETTINGS[phase]["stage"], config.train.layout_routing, target_sizes)
    start = time.monotonic()
    adapter = Trainer(config, STAGE_SETTINGS[phase]["stage"], source=source).train()
    report = {"steps": config.train.max_steps, "batch_size": config.train.batch_size,
              "minutes_this_run": (time.monotonic() - start) / 60,
              "started_from": config.model.adapter or "a fresh adapter", "overrides": overrides or [],
              **({"target_sizes": list(target_sizes)} if target_sizes != LONE_SIZES else {})}
    (out / phase / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return adapter


def _records(stage: int, layout_routing: bool, target_sizes: tuple[float, ...]) -> PairRecords:
    """The phase's data: stage 2's scenes, `layout_routing`'s scene pairs or the paper's pairs."""
    if (stage == 2 or layout_routing) and target_sizes != LONE_SIZES:
        raise ValueError("target_sizes applies to stage 1's single-subject pairs, not to scenes")
    if stage == 2:
        return SceneRecords()
    return ScenePairRecords() if layout_routing else PairRecords(target_sizes=target_sizes)
