"""Mini models are SDXL-shaped and within budget; training phases resume exactly."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPVisionModelWithProjection

from anystory.mini import recipe
from anystory.mini.models import (
    build_image_encoder,
    build_sampling_scheduler,
    build_text_encoders,
    build_tokenizers,
    build_unet,
    build_vae,
)
from anystory.mini.training import ResumableRun
from anystory.mini.world import IMAGE_SIZE, MiniWorld, TextToImageDataset

SHIPPED_BASE = Path(recipe.WEIGHTS_DIR) / "base"


def _pipeline() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizers()
    text_encoder, text_encoder_2 = build_text_encoders()
    image_encoder, feature_extractor = build_image_encoder()
    return StableDiffusionXLPipeline(
        vae=build_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=build_unet(), scheduler=build_sampling_scheduler(),
        image_encoder=image_encoder, feature_extractor=feature_extractor,
    )


def test_tokenizers_spell_every_caption_word_as_one_token():
    tokenizer = build_tokenizers()[0]
    caption = TextToImageDataset(MiniWorld())[0]["caption"]
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id == 0 and ids[-1] == tokenizer.eos_token_id == 1
    words = caption.replace(",", " ,").replace(";", " ;").split()
    assert len(ids) == len(words) + 2
    for encoder in build_text_encoders():
        assert encoder.config.eos_token_id == tokenizer.eos_token_id


def test_untrained_pipeline_generates_at_the_world_resolution(tmp_path):
    pipeline = _pipeline()
    assert pipeline.default_sample_size * pipeline.vae_scale_factor == IMAGE_SIZE

    def generate(pipe):
        return pipe("on the left, a red heart; snow background", num_inference_steps=2,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    image = generate(pipeline)
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    pipeline.save_pretrained(tmp_path)
    assert (generate(StableDiffusionXLPipeline.from_pretrained(tmp_path)) == image).all()


def test_base_models_fit_the_weight_budget():
    pipeline = _pipeline()
    parameters = sum(
        p.numel() for name in ("vae", "text_encoder", "text_encoder_2", "unet", "image_encoder")
        for p in getattr(pipeline, name).parameters()
    )
    assert parameters * 2 <= 20e6  # fp16 bytes


def _toy_run(directory, max_steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = ResumableRun(directory, {"model": model}, optimizer, max_steps=max_steps,
                       warmup_steps=3, log_every=1000)
    while not run.done:
        x = torch.randn(8, 4, generator=run.generator)
        run.optimize(model(x).pow(2).mean())
    run.save()
    return run


def test_interrupted_run_resumes_exactly(tmp_path):
    straight = _toy_run(tmp_path / "straight", 6)
    _toy_run(tmp_path / "killed", 3)
    resumed = _toy_run(tmp_path / "killed", 6)
    assert resumed.step == straight.step == 6
    for a, b in zip(straight.modules["model"].parameters(), resumed.modules["model"].parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.final("model").parameters(), resumed.final("model").parameters()):
        assert torch.equal(a, b)
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_vision_phase_resumes_to_the_same_weights(tmp_path):
    recipe.train_vision(tmp_path / "a", max_steps=4, batch_size=8)
    recipe.train_vision(tmp_path / "b", max_steps=2, batch_size=8)
    recipe.train_vision(tmp_path / "b", max_steps=4, batch_size=8)
    a, b = (CLIPVisionModelWithProjection.from_pretrained(tmp_path / d / "vision" / "final") for d in "ab")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert json.loads((tmp_path / "b" / "vision" / "report.json").read_text())["step"] == 4


@pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").exists(), reason="base weights not trained yet")
def test_shipped_base_weights_load_with_diffusers():
    pipeline = StableDiffusionXLPipeline.from_pretrained(SHIPPED_BASE)
    encoder = CLIPVisionModelWithProjection.from_pretrained(SHIPPED_BASE / "image_encoder")
    modules = ("vae", "unet", "text_encoder", "text_encoder_2", "image_encoder")
    assert {getattr(pipeline, name).dtype for name in modules} == {encoder.dtype} == {torch.float32}
    assert encoder.config.image_size == pipeline.feature_extractor.crop_size["height"]
    image = pipeline("in the middle, a cyan circle; beach background", num_inference_steps=2,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").exists(), reason="base weights not trained yet")
def test_base_phase_continues_from_a_pipeline_folder(tmp_path):
    torch.set_num_threads(1)
    recipe.run_phase("base", tmp_path, minutes=0.0, init=SHIPPED_BASE)  # a zero budget: export the start
    shipped = StableDiffusionXLPipeline.from_pretrained(SHIPPED_BASE)
    final = tmp_path / "base" / recipe.FINAL
    for key in ("unet", "text_encoder", "text_encoder_2"):
        exported = type(shipped.components[key]).from_pretrained(final / key).state_dict()
        assert exported.keys() == shipped.components[key].state_dict().keys()
        for name, value in shipped.components[key].state_dict().items():
            assert torch.equal(exported[name], value.float()), (key, name)
    with pytest.raises(FileNotFoundError, match="unet"):
        recipe.run_phase("base", tmp_path / "other", minutes=0.0, init=SHIPPED_BASE / "vae")


@pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").exists(), reason="base weights not trained yet")
def test_load_pipeline_takes_an_adapter_name_or_a_path_of_its_own(tmp_path, monkeypatch):
    from anystory.mini import load_pipeline

    shipped = load_pipeline("adapter_clip_only")
    monkeypatch.chdir(recipe.WEIGHTS_DIR.parent)  # "weights/adapter_clip_only" is not inside weights/
    relative = load_pipeline("weights/adapter_clip_only")
    assert relative.adapter.state_dict().keys() == shipped.adapter.state_dict().keys()
    for name, value in shipped.adapter.state_dict().items():
        assert torch.equal(relative.adapter.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="no_such_adapter"):
        load_pipeline(str(tmp_path / "no_such_adapter"))


def test_layout_routing_records_reference_every_subject_of_the_scene():
    from anystory.mini.stages import ScenePairRecords

    records = ScenePairRecords(length=32)
    counts = [len(records[i].masks) for i in range(32)]
    assert set(counts) == {1, 2, 3}
    for i in range(32):
        record = records[i]
        assert len(record.references) == len(record.masks) and len(record.subject_groups) == len(record.masks)
        assert all(mask.shape == reference_mask.shape and reference_mask.sum() > 50
                   for mask, (_, reference_mask) in zip(record.masks, record.references))


def test_stage2_records_label_twins_as_one_group():
    from anystory.mini.stages import SceneRecords
    from anystory.mini.world import Identity

    records = SceneRecords(length=64)
    twin_scenes = 0
    for index in range(64):
        record = records[index]
        phrases = [Identity.from_name(n).phrase for n in records.data[index]["identities"].split("|")]
        for i, j in ((i, j) for i in range(len(phrases)) for j in range(len(phrases))):
            assert (record.subject_groups[i] == record.subject_groups[j]) == (phrases[i] == phrases[j])
        twin_scenes += len(set(record.subject_groups)) < len(phrases)
    assert 16 <= twin_scenes <= 48  # the world draws twins in about half the scenes


def test_stage_configs_sample_late_timesteps_in_stage_1_and_start_stage_2_from_it(tmp_path):
    """Stage 1 trains copying where the pattern is still undecided (t >= 300); stage 2
    routes at every timestep the sampler visits, from stage 1's adapter; its context
    phase trains the router's convolutions alone, on stage 2's router."""
    from anystory.mini.stages import stage_config
    from anystory.training.config import config_from_dict

    first, second = (config_from_dict(stage_config(p, tmp_path)) for p in ("stage1", "stage2"))
    assert tuple(first.train.timestep_range) == (300, 1000) and first.model.adapter is None
    assert first.model.adapter_kwargs["reference_query"] and first.model.adapter_kwargs["use_reference_net"]
    assert second.train.timestep_range is None and second.model.adapter == str(tmp_path / "stage1" / "adapter")
    assert not first.train.layout_routing  # the paper's stage 1: one subject, routed everywhere
    assert not second.model.add_router_context and not second.train.router_context_only  # the paper's router
    context = config_from_dict(stage_config("stage2_context", tmp_path))
    assert context.model.adapter == str(tmp_path / "stage2" / "adapter")  # on top of the trained router
    assert context.model.add_router_context == 2 and context.train.router_context_only
    clip_only = config_from_dict(stage_config("stage1_clip_only", tmp_path)).model.adapter_kwargs
    assert not clip_only["use_reference_net"] and not clip_only["routing_from_reference"]
    assert not clip_only["reference_query"]  # AnyStoryAdapter refuses it without a ReferenceNet


def test_everything_shipped_in_the_weights_folder_stays_within_50_mb():
    """The issue's budget for bundled weights, over every file the package carries there
    (base, adapters, evaluator, configs) plus the resume points kept in `checkpoints/`:
    what a fresh clone downloads."""
    from anystory.mini import WEIGHTS_DIR

    resume_points = Path(__file__).resolve().parents[2] / "checkpoints"
    files = [f for folder in (WEIGHTS_DIR, resume_points) for f in folder.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert sum(f.stat().st_size for f in files) <= 50e6
    assert max(f.stat().st_size for f in files) < 5 * 2**20  # sharded: no single tracked file is large


@pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").exists(), reason="base weights not trained yet")
def test_base_phase_takes_a_learning_rate_and_records_it(tmp_path):
    torch.set_num_threads(1)
    recipe.main(["--phase", "base", "--out", str(tmp_path), "--minutes", "0", "--init", str(SHIPPED_BASE),
                 "--lr", "1e-3"])
    assert json.loads((tmp_path / "base" / "report.json").read_text())["lr"] == 1e-3
    with pytest.raises(SystemExit):
        recipe.main(["--phase", "stage1", "--lr", "1e-3"])  # the stages take train.learning_rate=


@pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").exists(), reason="base weights not trained yet")
def test_stage_phase_takes_trainer_overrides_and_records_them(tmp_path):
    from anystory import AnyStoryAdapter
    from anystory.mini.stages import ADAPTER_KWARGS, train_stage

    torch.set_num_threads(1)
    overrides = ["model.adapter_kwargs={reference_query: false}", "train.batch_size=2"]
    exported = train_stage("stage1", tmp_path, base=SHIPPED_BASE, steps=1, overrides=overrides)
    config = AnyStoryAdapter.from_pretrained(exported).config
    assert ADAPTER_KWARGS["reference_query"] and not config.reference_query  # the override wins, the rest stays
    assert config.num_subject_tokens == ADAPTER_KWARGS["num_subject_tokens"]
    report = json.loads((tmp_path / "stage1" / "report.json").read_text())
    assert report["overrides"] == overrides and report["batch_size"] == 2 and report["steps"] == 1
    with pytest.raises(SystemExit):
        recipe.main(["--phase", "base", "train.batch_size=2"])  # overrides are for the stages only


def test_stage_1_takes_target_sizes_and_records_them(tmp_path):
    from anystory.mini.stages import train_stage

    torch.set_num_threads(1)
    train_stage("stage1", tmp_path, base=SHIPPED_BASE, steps=1, overrides=["train.batch_size=2"],
                target_sizes=(0.5, 0.4, 0.1))
    assert json.loads((tmp_path / "stage1" / "report.json").read_text())["target_sizes"] == [0.5, 0.4, 0.1]
    with pytest.raises(ValueError, match="target_sizes"):
        train_stage("stage2", tmp_path, base=SHIPPED_BASE, steps=1, target_sizes=(0.5, 0.5, 0.0))
    for argv in (["--phase", "stage1", "--target-sizes", "0.5,0.6,0"], ["--phase", "stage2", "--target-sizes", "1,0,0"]):
        with pytest.raises(SystemExit):
            recipe.main(argv)


def test_calibration_picks_the_most_accurate_and_on_ties_the_least_departure_from_training():
    from anystory.mini.calibration import Sampling, SamplingCalibration

    kept, dropped = (lambda shift: Sampling(True, shift)), (lambda shift: Sampling(False, shift))
    assert SamplingCalibration(8, {kept(0): 0.25, kept(2): 0.5, kept(3): 0.5, dropped(0): 0.375}).best == kept(2)
    assert SamplingCalibration(8, {kept(0): 0.5, kept(1): 0.25, dropped(0): 0.5}).best == kept(0)
    assert SamplingCalibration(8, {kept(0): 0.5, dropped(2): 0.75, dropped(0): 0.75}).best == dropped(0)


def test_calibration_cases_never_touch_the_evaluations_identities():
    from anystory.mini.claims import single_subject_groups

    groups = single_subject_groups(40, stream="calibration", split="train")
    assert len(groups) == 10 and not any(g.identities[0].held_out for g in groups)
    assert not any(c.held_out for g in groups for case in g.candidates for c in case)
    assert all(g.identities[0] in case for g in groups for case in g.candidates)


@pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").exists(), reason="base weights not trained yet")
def test_calibrate_phase_stores_the_best_settings_as_the_pipelines_defaults(tmp_path):
    import shutil

    from anystory.mini import load_pipeline
    from anystory.mini.calibration import Sampling

    torch.set_num_threads(1)
    weights = tmp_path / "weights"
    weights.mkdir()
    for folder in ("base", "evaluator"):
        (weights / folder).symlink_to(recipe.WEIGHTS_DIR / folder)
    shutil.copytree(recipe.WEIGHTS_DIR / "adapter", weights / "adapter")
    candidates = (Sampling(True, 0.0), Sampling(False, 3.0))
    chosen = recipe.calibrate_adapter(tmp_path / "run", weights, count=4, candidates=candidates)
    report = json.loads((tmp_path / "run" / "calibrate" / "report.json").read_text())
    accuracy = report["identity_accuracy"]
    assert list(accuracy) == [c.label for c in sorted(candidates)]
    assert accuracy[Sampling(**chosen).label] == max(accuracy.values())
    config = load_pipeline("adapter", weights).adapter.config
    assert (config.unconditional_references, config.reference_shift) == (chosen["unconditional_references"], chosen["reference_shift"])
    assert "identity_accuracy" in (weights / "README.md").read_text()  # the model card shows it
