import numpy as np
import pytest
import torch

from anystory import AnyStoryAdapter
from anystory.training import Trainer
from anystory.training.transforms import collate
from conftest import calibrated_tiny_components, tiny_config
from shapes import pair_records, scene_records

FROZEN = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")


def records(stage: int, count: int = 16, seed: int = 0):
    return pair_records(count, seed) if stage == 1 else scene_records(count, seed)


def trained_groups(adapter: AnyStoryAdapter, stage: int, context_only: bool = False) -> dict[str, list[torch.nn.Parameter]]:
    if stage == 1:
        layers = adapter.layers
        return {
            "subject_qformer": list(adapter.subject_qformer.parameters()),
            "reference_net": adapter.reference_net.used_parameters(),  # its unread tail stays frozen
            "subject_kv": [p for l in layers for p in (l.subject_k.weight, l.subject_v.weight)],
            "reference_kv": [p for l in layers[1:] for p in (l.reference_k.weight, l.reference_v.weight)],
        }
    if context_only:
        return {"router_context": [p for l in adapter.layers for p in l.router.latent_context.parameters()]}
    return {
        "routing_qformer": list(adapter.routing_qformer.parameters()),
        "router": [p for l in adapter.layers for p in l.router.parameters()],
    }


CONTEXT_ONLY = ("model.adapter_kwargs={router_context: 2}", "train.router_context_only=true")


@pytest.mark.parametrize("stage, overrides", [(1, ()), (2, ()), (2, CONTEXT_ONLY)], ids=["stage1", "stage2", "context_only"])
def test_only_the_stage_group_trains_and_the_export_loads(tmp_path, stage, overrides):
    config = tiny_config(stage, tmp_path, "train.max_steps=3", "train.learning_rate=1e-3", *overrides)
    trainer = Trainer(config, stage, source=records(stage))
    pipe, adapter = trainer.pipeline, trainer.adapter
    groups = trained_groups(adapter, stage, context_only=bool(overrides))
    trained_ids = {id(p) for group in groups.values() for p in group}
    adapter_ids = {id(p) for p in adapter.parameters()}  # the U-Net also lists them, through its processors
    frozen = {f"{name}.{k}": p for name in FROZEN for k, p in getattr(pipe, name).named_parameters() if id(p) not in adapter_ids}
    frozen.update({f"adapter.{k}": p for k, p in adapter.named_parameters() if id(p) not in trained_ids})
    before_frozen = {k: p.detach().clone() for k, p in frozen.items()}
    before_groups = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}

    export = trainer.train()

    changed = [k for k, p in frozen.items() if not torch.equal(p, before_frozen[k])]
    assert not changed, f"frozen parameters changed: {changed[:5]}"
    for group, params in groups.items():
        assert any(not torch.equal(p, b) for p, b in zip(params, before_groups[group])), f"{group} did not change"
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == trained_ids
    loaded = AnyStoryAdapter.from_pretrained(export)
    assert loaded.config.router_trained == (stage == 2)
    for (name, mine), theirs in zip(adapter.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_router_context_is_added_to_a_loaded_adapter_and_keeps_its_weights(tmp_path):
    export = Trainer(tiny_config(2, tmp_path / "first", "train.max_steps=1"), 2, source=records(2)).train()
    config = tiny_config(2, tmp_path / "second", f"model.adapter={export}", "model.add_router_context=2", *CONTEXT_ONLY[1:])
    adapter = Trainer(config, 2, source=records(2)).adapter
    loaded = AnyStoryAdapter.from_pretrained(export).state_dict()
    assert adapter.config.router_context == 2
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in loaded.items())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        trainer = Trainer(tiny_config(1, tmp_path / str(checkpointing), f"train.gradient_checkpointing={checkpointing}"), 1, source=records(1))
        batch = next(trainer.data.batches(0))
        losses = trainer.objective(batch, generator=torch.Generator().manual_seed(0))
        losses["loss"].backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in trainer.trainable])
    assert sum(g is not None for g in grads[0]) > 0
    for plain, checkpointed in zip(*grads):
        assert (plain is None) == (checkpointed is None)
        if plain is not None:
            torch.testing.assert_close(plain, checkpointed, rtol=1e-4, atol=1e-6)


def test_ema_weights_are_exported(tmp_path):
    trainer = Trainer(tiny_config(2, tmp_path, "train.max_steps=3", "train.ema=true", "train.ema_decay=0.5", "train.learning_rate=1e-2"), 2, source=records(2))
    export = trainer.train()
    loaded = dict(AnyStoryAdapter.from_pretrained(export).named_parameters())
    names = {id(p): n for n, p in trainer.adapter.named_parameters()}
    for live, shadow in zip(trainer.trainable, trainer.ema.shadow_params):
        torch.testing.assert_close(loaded[names[id(live)]], shadow)
    assert any(not torch.equal(loaded[names[id(p)]], p) for p in trainer.trainable)


# -- learning on the synthetic shapes ------------------------------------------------------------------


def held_out_losses(trainer: Trainer, stage: int) -> dict[str, float]:
    """Losses on 16 unseen samples with fixed noise, timesteps and Gumbel draws."""
    batch = collate([trainer.transform(r, np.random.default_rng(i)) for i, r in enumerate(records(stage, 16, seed=99))])
    totals: dict[str, float] = {}
    with torch.no_grad(), torch.random.fork_rng():
        for seed in range(4):
            torch.manual_seed(seed)
            losses = trainer.objective(batch, generator=torch.Generator().manual_seed(seed), record_maps=True)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value) / 4
    return totals


def test_stage1_diffusion_loss_falls(tmp_path):
    config = tiny_config(1, tmp_path, "train.max_steps=200", "train.learning_rate=3e-3", "train.sample_latents=false", "output.checkpoint_every=1000")
    trainer = Trainer(config, 1, source=records(1, 64), components=calibrated_tiny_components())
    before = held_out_losses(trainer, 1)
    trainer.train()
    after = held_out_losses(trainer, 1)
    assert after["diffusion_loss"] < 0.97 * before["diffusion_loss"], (before, after)


def test_stage2_routing_loss_falls_and_routing_iou_rises(tmp_path):
    """The random tiny U-Net's features localise subjects only at moderate noise, so the
    timesteps are drawn from [0, 400) here (a trained base localises at all noise levels)."""
    config = tiny_config(
        2, tmp_path, "train.max_steps=250", "train.batch_size=8", "train.learning_rate=1e-3",
        "train.sample_latents=false", "train.timestep_range=[0, 400]", "output.checkpoint_every=1000",
    )
    trainer = Trainer(config, 2, source=records(2, 64), components=calibrated_tiny_components())
    before = held_out_losses(trainer, 2)
    trainer.train()
    after = held_out_losses(trainer, 2)
    assert after["routing_loss"] < 0.75 * before["routing_loss"], (before, after)
    assert after["routing_iou"] > before["routing_iou"] + 0.04, (before, after)
    assert after["diffusion_loss"] < before["diffusion_loss"], (before, after)


def test_subject_loss_weight_adds_exactly_the_weighted_subject_error(tmp_path):
    """loss(w) = mean(err) + w * mean(mask * err) on the same batch, noise and timesteps:
    the extra term is linear in w and vanishes at w = 0 (the paper's plain loss)."""
    losses = {}
    for weight in (0.0, 1.0, 4.0):
        config = tiny_config(1, tmp_path / str(weight), f"train.subject_loss_weight={weight}", "train.sample_latents=false")
        trainer = Trainer(config, 1, source=records(1, 8), components=calibrated_tiny_components())
        losses[weight] = held_out_losses(trainer, 1)["diffusion_loss"]
    subject_term = losses[1.0] - losses[0.0]
    assert 0 < subject_term < 0.8 * losses[0.0]  # the subjects' share, not the whole image
    assert losses[4.0] - losses[0.0] == pytest.approx(4 * subject_term, rel=1e-4)


def _diffusion_loss(trainer: Trainer, batch: dict) -> float:
    with torch.no_grad():
        return float(trainer.objective(batch, generator=torch.Generator().manual_seed(0))["diffusion_loss"])


def test_layout_routing_routes_each_subject_to_its_own_target_mask(tmp_path):
    """Stage 1's `layout_routing` deviation. With two subjects, swapping their references
    (masks kept) changes the loss only when each is routed to its own mask: routed
    everywhere, the method is equivariant in the subjects. A lone subject keeps the
    paper's route (everywhere), so its loss is the same with the option on or off."""
    config = tiny_config(1, tmp_path, "train.layout_routing=true", "train.sample_latents=false", "data.max_subjects=2")
    trainer = Trainer(config, 1, source=scene_records(4), components=calibrated_tiny_components())
    pair = collate([trainer.transform(scene_records(1, seed=5)[0], np.random.default_rng(0))])
    assert pair["subject_valid"].tolist() == [[True, True]]  # stage 1 now takes both subjects
    swapped = dict(pair, **{k: pair[k].flip(1) for k in ("clip_pixels", "reference_pixels", "reference_masks")})
    single = collate([trainer.transform(pair_records(1, seed=5)[0], np.random.default_rng(0))])
    routed = {name: _diffusion_loss(trainer, batch) for name, batch in
              (("pair", pair), ("swapped", swapped), ("single", single))}
    trainer.objective.layout_routing = False
    everywhere = {name: _diffusion_loss(trainer, batch) for name, batch in
                  (("pair", pair), ("swapped", swapped), ("single", single))}
    assert abs(routed["pair"] - routed["swapped"]) > 1e-4 * routed["pair"], routed
    assert everywhere["pair"] == pytest.approx(everywhere["swapped"], rel=1e-5)
    assert routed["single"] == pytest.approx(everywhere["single"], rel=1e-6)
