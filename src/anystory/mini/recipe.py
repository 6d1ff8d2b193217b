"""Train the mini world's base models from nothing, phase by phase, resumably.

    python -m anystory.mini.recipe --phase vae|base|vision|assemble|evaluator|stage1|...|all \
        [--steps N] [--minutes M] [--out runs/mini] [--threads 1] [--weights DIR] [--init DIR] [--lr LR] [section.key=value ...]

Phases, with default step budgets (`DEFAULT_STEPS`; s/step measured here with one CPU
thread, and with two where it was run so):
- vae (2000 steps, 0.39 s/step, ~13 min): AutoencoderKL, L1 reconstruction weighted 5x
  on subject pixels (where the pattern is) + tiny KL;
- base (16000, 1.1 s/step or 0.64 with 2 threads, ~170 min with 2): both text encoders
  jointly with the U-Net, text-to-image, epsilon loss under SDXL's DDPM schedule,
  captions dropped to zeros 10 % of the time (what the pipeline's
  `force_zeros_for_empty_prompt` feeds the unconditional branch). The first 3000 steps
  drew blobs: the captioned shape came out right 25-30 % of the time (chance 20 %),
  0.77 at 8000 steps, 0.86 at 10700 and 0.94 at 14979 (64 held-out prompts,
  evaluator-read);
- vision (1500, ~5 min): CLIP vision encoder, contrastive against "a <colour> <shape>"
  with a throwaway text tower, on segmented subject crops made by `anystory.Subject`;
- assemble: the `StableDiffusionXLPipeline` folder (fp16) in `<weights>/base`, with
  `image_encoder` and `feature_extractor`, plus a sample grid for a look;
- evaluator (1000, ~6 min): the ground-truth-only evaluator, in `<weights>/evaluator`;
- stage1, stage1_clip_only, stage2, stage2_context, ship: AnyStory itself
  (`anystory.mini.stages`; 28000, 7000, 2500 and 2500 steps at about 0.6 (0.45 with 2
  threads), 0.45, 1.0 (0.7 with 2 threads) and 0.6 with 2 threads s/step, ~4.5 h, ~50 min,
  ~45 min and ~25 min), then the adapters into `<weights>` in fp16;
- calibrate (~9 min): the shipped adapter's sampling settings (gamma, and what CFG's
  unconditional branch keeps), chosen on training identities (`anystory.mini.calibration`)
  and written into its config.
`all` runs them in that order, skipping finished ones. A phase killed at any point
resumes from its last checkpoint when rerun with the same command.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..subject import Subject
from ..utils.weight_files import load_tensors, weight_files
from .evaluator import TRAINING_STEPS as EVALUATOR_STEPS
from .evaluator import train_evaluator
from .models import (
    MAX_TOKENS,
    VISION_SIZE,
    build_image_encoder,
    build_sampling_scheduler,
    build_text_encoders,
    build_tokenizers,
    build_train_scheduler,
    build_unet,
    build_vae,
)
from .training import ResumableRun, batch_at
from .world import COLOURS, IMAGE_SIZE, SHAPES, MiniWorld, TextToImageDataset, WorldDataset, check_target_sizes

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Step budgets (speeds in the module docstring). The base dominates: the 2-hour recipe
# the mini world was planned for does not hold, because a base that draws the captioned
# shapes needs ~16000 steps of batch 64, not the 3000 first budgeted.
DEFAULT_STEPS = {"vae": 2000, "base": 16000, "vision": 1500, "evaluator": EVALUATOR_STEPS}
SUBJECT_WEIGHT = 4.0  # extra VAE loss weight on subject pixels, where the pattern is
KL_WEIGHT = 1e-6
CAPTION_DROP = 0.1
TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)  # SDXL size/crop ids
FINAL = "final"
# Shipped model files are sharded below 5 MB each (diffusers/transformers `max_shard_size`),
# so that no single tracked file is large; `from_pretrained` reads the shards as one model.
SHARD_SIZE = "4MB"


def _finished(directory: Path) -> bool:
    """Every training phase writes its report last."""
    return (directory / "report.json").exists()


# --------------------------------------------------------------------------- vae


def train_vae(out: Path, max_steps: int | None = DEFAULT_STEPS["vae"], minutes: float | None = None,
              batch_size: int = 16, lr: float = 5e-4, seed: int = 0) -> Path:
    """Train the VAE and save it (with its latent scaling factor) to out/vae/final."""
    torch.manual_seed(seed)
    vae = build_vae()
    data = TextToImageDataset(MiniWorld(), seed=seed + 101)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    run = ResumableRun(out / "vae", {"vae": vae}, optimizer, max_steps=max_steps, minutes=minutes, seed=seed)
    while not run.done:
        batch = batch_at(data, run.step, batch_size)
        images, weight = batch["image"], 1.0 + SUBJECT_WEIGHT * batch["mask"]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=run.generator)).sample
        loss = (weight * (recon - images).abs()).mean() + KL_WEIGHT * posterior.kl().mean()
        run.optimize(loss)
    run.save()
    final = run.final("vae").eval()
    report = _calibrate_vae(final, TextToImageDataset(MiniWorld(), split="held_out", seed=seed + 102))
    final.save_pretrained(out / "vae" / FINAL)
    _write_report(out / "vae", {"step": run.step, "minutes": run.elapsed / 60, **report})
    return out / "vae" / FINAL


@torch.no_grad()
def _calibrate_vae(vae: AutoencoderKL, data: WorldDataset, count: int = 256) -> dict:
    """Set `scaling_factor` to 1 / latent std (unit-variance latents for the U-Net) and
    measure reconstruction PSNR on held-out renders, overall and on subject pixels."""
    batch = batch_at(data, 0, count)
    images, mask = batch["image"], batch["mask"]
    latents = vae.encode(images).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    recon = vae.decode(latents).sample.clamp(-1, 1)
    error = ((recon - images) / 2) ** 2
    subject_mse = (error * mask).sum() / (mask.sum() * 3)
    return {
        "scaling_factor": vae.config.scaling_factor,
        "latent_mean": float(latents.mean()),
        "psnr_db": float(-10 * torch.log10(error.mean())),
        "subject_psnr_db": float(-10 * torch.log10(subject_mse)),
    }


# --------------------------------------------------------------------------- base


def encode_captions(captions: list[str], tokenizers, text_encoders) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: concatenated penultimate hidden states of both encoders,
    and the second encoder's pooled projection (as `StableDiffusionXLPipeline.encode_prompt`)."""
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), output.text_embeds


def train_base(out: Path, max_steps: int | None = DEFAULT_STEPS["base"], minutes: float | None = None,
               batch_size: int = 64, lr: float = 3e-4, seed: int = 0, init: Path | None = None,
               vae_dir: Path | None = None) -> Path:
    """Train both text encoders and the U-Net jointly, text-to-image, on frozen VAE latents.

    `init` (a pipeline folder, e.g. the shipped base) continues training from its weights
    with a fresh optimizer, for a run that did not keep its checkpoint; `vae_dir` takes
    the VAE from elsewhere than this run's own vae phase (e.g. `init / "vae"`).
    """
    init_files = {key: weight_files(init / key) for key in BASE_MODULES} if init is not None else None
    vae = AutoencoderKL.from_pretrained(vae_dir or out / "vae" / FINAL, torch_dtype=torch.float32)
    vae.requires_grad_(False).eval()
    torch.manual_seed(seed)
    tokenizers = build_tokenizers()
    text_encoder, text_encoder_2 = build_text_encoders()
    unet = build_unet()
    modules = dict(zip(BASE_MODULES, (unet, text_encoder, text_encoder_2)))
    if init_files is not None:
        _load_weights(modules, init_files)
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    run = ResumableRun(out / "base", modules, optimizer, max_steps=max_steps, minutes=minutes, seed=seed,
                       warmup_steps=200)
    noise_scheduler = build_train_scheduler()
    data = TextToImageDataset(MiniWorld(), seed=seed + 201)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).expand(batch_size, -1)
    while not run.done:
        batch = batch_at(data, run.step, batch_size)
        with torch.no_grad():
            posterior = vae.encode(batch["image"]).latent_dist
            latents = posterior.sample(generator=run.generator) * vae.config.scaling_factor
        prompt_embeds, pooled = encode_captions(batch["caption"], tokenizers, (text_encoder, text_encoder_2))
        keep = (torch.rand(batch_size, generator=run.generator) >= CAPTION_DROP).float()
        prompt_embeds, pooled = prompt_embeds * keep[:, None, None], pooled * keep[:, None]
        noise = torch.randn(latents.shape, generator=run.generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=run.generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        run.optimize(F.mse_loss(prediction, noise))
    run.save()
    for key in BASE_MODULES:
        run.final(key).save_pretrained(out / "base" / FINAL / key)
    _write_report(out / "base", {"step": run.step, "minutes": run.elapsed / 60, "lr": lr,
                                 "started_from": str(init) if init is not None else "nothing"})
    return out / "base" / FINAL


BASE_MODULES = ("unet", "text_encoder", "text_encoder_2")


def _load_weights(modules: dict[str, nn.Module], files: dict[str, list[Path]]) -> None:
    """Copy each module's weights from its files (stored fp16 or fp32, whole or sharded;
    the modules stay fp32). Keys and shapes must match exactly."""
    for key, module in modules.items():
        module.load_state_dict({k: v.float() for k, v in load_tensors(files[key]).items()}, strict=True)
    print(f"[base] initialised {', '.join(modules)} from {files['unet'][0].parent.parent}", flush=True)


# --------------------------------------------------------------------------- vision


class SubjectCropDataset(WorldDataset):
    """One subject of a 1-3 subject scene, segmented and cropped exactly as the pipeline
    does (`Subject.clip_pixels`), with its caption phrase ("a red heart")."""

    stream = 4

    def __init__(self, world: MiniWorld, mean: list[float], std: list[float], **kwargs):
        super().__init__(world, **kwargs)
        self.mean, self.std = mean, std

    def sample(self, rng: np.random.Generator) -> dict:
        count = int(rng.integers(1, 4))
        subjects = self.world.sample_identities(rng, count, self.split, twin_prob=0.3)
        render = self.world.render(self.world.sample_scene(rng, subjects))
        k = int(rng.integers(count))
        subject = Subject(render.image, render.masks[k].astype(np.uint8) * 255)
        return {
            "pixels": subject.clip_pixels(VISION_SIZE, self.mean, self.std),
            "phrase": render.scene.placements[k].identity.phrase,
        }


class PhraseTower(nn.Module):
    """Throwaway text side of contrastive training, with the learned temperature (the
    shipped model is the vision side only)."""

    def __init__(self) -> None:
        super().__init__()
        config = CLIPTextConfig(
            vocab_size=len(build_tokenizers()[0]), hidden_size=32, intermediate_size=128, projection_dim=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
        self.encoder = CLIPTextModelWithProjection(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids).text_embeds


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, labels: list[str],
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss whose targets spread evenly over repeated labels in a batch."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.clamp(max=math.log(100)).exp() * image @ text.T
    same = torch.tensor([[a == b for b in labels] for a in labels], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    return -(targets * (logits.log_softmax(1) + logits.T.log_softmax(1))).sum(1).mean() / 2


def train_vision(out: Path, max_steps: int | None = DEFAULT_STEPS["vision"], minutes: float | None = None,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> Path:
    """Train the vision encoder contrastively and save it with its image processor."""
    torch.manual_seed(seed)
    image_encoder, processor = build_image_encoder()
    tokenizer = build_tokenizers()[0]
    text_tower = PhraseTower()
    modules = {"image_encoder": image_encoder, "text_tower": text_tower}
    params = [*image_encoder.parameters(), *text_tower.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    run = ResumableRun(out / "vision", modules, optimizer, max_steps=max_steps, minutes=minutes, seed=seed,
                       log_every=20)
    data = SubjectCropDataset(MiniWorld(), processor.image_mean, processor.image_std, seed=seed + 301)
    phrases = sorted({f"a {c} {s}" for c in COLOURS for s in SHAPES})
    phrase_ids = tokenizer(phrases, padding="max_length", return_tensors="pt").input_ids
    while not run.done:
        batch = batch_at(data, run.step, batch_size)
        text = text_tower(phrase_ids)
        image = image_encoder(batch["pixels"]).image_embeds
        labels = batch["phrase"]
        loss = contrastive_loss(image, text[[phrases.index(p) for p in labels]], labels, text_tower.logit_scale)
        run.optimize(loss)
    run.save()
    final = run.final("image_encoder").eval()
    held_out = SubjectCropDataset(MiniWorld(), processor.image_mean, processor.image_std,
                                  split="held_out", seed=seed + 302)
    accuracy = _zero_shot_accuracy(final, run.final("text_tower"), phrase_ids, phrases, held_out)
    final.save_pretrained(out / "vision" / FINAL)
    processor.save_pretrained(out / "vision" / FINAL)
    _write_report(out / "vision", {"step": run.step, "minutes": run.elapsed / 60,
                                   "zero_shot_shape_colour_accuracy": accuracy})
    return out / "vision" / FINAL


@torch.no_grad()
def _zero_shot_accuracy(image_encoder, text_tower, phrase_ids, phrases, data, count: int = 512) -> float:
    """How often the nearest phrase to a held-out crop names its shape and colour."""
    batch = batch_at(data, 0, count)
    image = F.normalize(image_encoder(batch["pixels"]).image_embeds, dim=-1)
    text = F.normalize(text_tower(phrase_ids), dim=-1)
    predicted = [phrases[i] for i in (image @ text.T).argmax(1)]
    return float(np.mean([p == t for p, t in zip(predicted, batch["phrase"])]))


# --------------------------------------------------------------------------- assemble


def assemble(out: Path, weights: Path = WEIGHTS_DIR) -> Path:
    """Write the base models as one `StableDiffusionXLPipeline` folder in fp16."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    base = out / "base" / FINAL
    tokenizer, tokenizer_2 = build_tokenizers()
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae" / FINAL),
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2"),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel.from_pretrained(base / "unet"),
        scheduler=build_sampling_scheduler(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(out / "vision" / FINAL),
        feature_extractor=CLIPImageProcessor.from_pretrained(out / "vision" / FINAL),
    )
    _measure_base(pipeline, out, weights)
    target = weights / "base"
    pipeline.to(torch.float16).save_pretrained(target, max_shard_size=SHARD_SIZE)
    for folder in ("text_encoder", "text_encoder_2", "image_encoder"):
        _declare_float32(target / folder / "config.json")
    write_model_card(out, weights)
    return target


def _declare_float32(config_path: Path) -> None:
    """Weights are stored in fp16 to fit the size budget, but a plain `from_pretrained`
    must compute in fp32 on a CPU: diffusers models load as fp32 by default while
    transformers models follow the config's `dtype`, and mixing the two fails."""
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(out: Path, weights: Path = WEIGHTS_DIR) -> None:
    """weights/README.md: what ships, how it was made, and each phase's own numbers."""
    reports = {
        phase: json.loads(path.read_text())
        for phase, path in [(p, out / p / "report.json") for p in ("vae", "base", "vision", "evaluator", *STAGES, "calibrate")]
        if path.exists()
    }
    sizes: dict[str, float] = {}  # per model folder, its shards summed
    for file in sorted(weights.rglob("*.safetensors")):
        folder = str(file.parent.relative_to(weights))
        sizes[folder] = sizes.get(folder, 0.0) + file.stat().st_size / 1e6
    lines = [
        "# Mini-world weights",
        "",
        "Tiny SDXL-shaped models trained from scratch on the procedural mini world",
        "(`anystory.mini.world`, DESIGN.md section 3), on a 2-core CPU, with the phases of",
        "`python -m anystory.mini.recipe`; each phase's report below gives its steps, its minutes",
        "and what it continued from.",
        "Nothing pretrained went in. Licence: Apache-2.0, like the code.",
        "",
        "- `base/`: a `StableDiffusionXLPipeline` folder (fp16): VAE (f=4, 64x64 images,",
        "  16x16 latents), two CLIP text encoders over the world's words, the U-Net, Euler",
        "  with Karras sigmas, and a CLIP vision encoder (`image_encoder`, 16x16 input) with",
        "  its `feature_extractor`.",
        "- `adapter/`: the AnyStory adapter (`anystory.mini.stages`: stage 1, then stage 2 on",
        "  top, then `stage2_context`: the `router_context` deviation's convolutions trained on",
        "  stage 2's router, used in scenes of two or more subjects only), trained with the",
        "  project's `Trainer` on the world's pairs and scenes; its",
        "  config's `reference_shift` and `unconditional_references` are sampling settings",
        "  chosen on training identities (phase `calibrate`, `anystory.mini.calibration`).",
        "- `adapter_clip_only/`: the paper's CLIP-only ablation (stage 1 without ReferenceNet).",
        "- `evaluator/`: the ground-truth-only evaluator (`anystory.mini.evaluator`).",
        "",
        f"Sizes (MB, {sum(sizes.values()):.1f} in all, each file under 5): " + ", ".join(f"`{k}` {v:.2f}" for k, v in sizes.items()),
        "",
        "Each phase's report (steps, training minutes on the machine it ran on, held-out numbers):",
        "",
        "```json",
        json.dumps(reports, indent=2),
        "```",
        "",
    ]
    (weights / "README.md").write_text("\n".join(lines))


BASE_PROMPTS = 64  # held-out prompts, half single- and half two-subject


@torch.no_grad()
def _measure_base(pipeline: StableDiffusionXLPipeline, out: Path, weights: Path) -> None:
    """Read what the base draws for held-out captions (the text claim's base cell) and
    record it in the base phase's report, which the model card shows; the contact sheet
    goes to out/base_samples.png for a look."""
    from .claims import text_alignment
    from .evaluator import MiniEvaluator

    pipeline.set_progress_bar_config(disable=True)
    result = text_alignment(pipeline, MiniEvaluator.from_pretrained(weights / "evaluator"), count=BASE_PROMPTS,
                            sheet=out / "base_samples.png", cells=("base",))
    report = json.loads((out / "base" / "report.json").read_text())
    report["held_out_prompts"] = {"count": BASE_PROMPTS, **{metric: getattr(result, metric)["base"]
                                                            for metric in ("background", "position", "attributes")}}
    _write_report(out / "base", report)


# --------------------------------------------------------------------------- driver


def _write_report(directory: Path, report: dict) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[{directory.name}] {json.dumps(report)}", flush=True)


def ship_adapters(out: Path, weights: Path = WEIGHTS_DIR) -> None:
    """Copy the trained adapters into `weights/` in fp16 (the full one and the ablation)."""
    from ..models import AnyStoryAdapter

    for phase, name in (("stage2_context", "adapter"), ("stage1_clip_only", "adapter_clip_only")):
        source = out / phase / "adapter"
        if source.exists():
            AnyStoryAdapter.from_pretrained(source).to(torch.float16).save_pretrained(weights / name, max_shard_size=SHARD_SIZE)
    write_model_card(out, weights)


def calibrate_adapter(out: Path, weights: Path = WEIGHTS_DIR, **calibration) -> dict:
    """Choose the shipped adapter's sampling settings on training identities
    (`anystory.mini.calibration`; `calibration`: its count and candidates) and store them
    in the adapter's config as the pipeline's defaults."""
    from . import load_pipeline
    from .calibration import calibrate_sampling
    from .evaluator import MiniEvaluator

    pipe = load_pipeline("adapter", weights)
    pipe.set_progress_bar_config(disable=True)
    result = calibrate_sampling(pipe, MiniEvaluator.from_pretrained(weights / "evaluator"), **calibration)
    chosen = asdict(result.best)
    config_path = weights / "adapter" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **chosen}, indent=2, sort_keys=True) + "\n")
    (out / "calibrate").mkdir(parents=True, exist_ok=True)
    _write_report(out / "calibrate", {
        **chosen, "cases": result.count, "identities": "training (stream 'calibration')",
        "identity_accuracy": {c.label: accuracy for c, accuracy in sorted(result.accuracy.items())},
    })
    write_model_card(out, weights)
    return chosen


def run_phase(phase: str, out: Path, steps: int | None = None, minutes: float | None = None,
              init: Path | None = None, weights: Path = WEIGHTS_DIR, overrides: list[str] | None = None,
              lr: float | None = None, target_sizes: tuple[float, ...] | None = None) -> None:
    if phase == "assemble":
        assemble(out, weights)
        return
    if phase == "ship":
        ship_adapters(out, weights)
        return
    if phase == "calibrate":
        calibrate_adapter(out, weights)
        return
    if phase in STAGES:
        from .stages import train_stage

        sizes = {"target_sizes": target_sizes} if target_sizes else {}
        train_stage(phase, out, base=weights / "base", steps=steps, init_adapter=init, overrides=overrides, **sizes)
        return
    budget = {"max_steps": steps or DEFAULT_STEPS[phase], "minutes": minutes, **({"lr": lr} if lr else {})}
    if phase == "vae":
        train_vae(out, **budget)
    elif phase == "base":
        # Continuing a pipeline folder takes its VAE too (the latent space it was trained in).
        train_base(out, **budget, init=init, vae_dir=init / "vae" if init else None)
    elif phase == "vision":
        train_vision(out, **budget)
    elif phase == "evaluator":
        train_evaluator(out / "evaluator", **budget, weights=weights / "evaluator")
    else:
        raise ValueError(f"unknown phase {phase!r}")


STAGES = ("stage1", "stage2", "stage2_context", "stage1_clip_only")  # AnyStory itself, with the project's Trainer
PHASES = ("vae", "base", "vision", "evaluator", "assemble", *STAGES, "ship", "calibrate")


def _probabilities(text: str) -> tuple[float, ...]:
    """argparse type of `--target-sizes`: comma-separated probabilities, validated by the world."""
    try:
        return check_target_sizes(float(p) for p in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", required=True, choices=(*PHASES, "all"))
    parser.add_argument("--steps", type=int, default=None, help="step budget (single phase; default per phase)")
    parser.add_argument("--minutes", type=float, default=None, help="also stop after this much training time")
    parser.add_argument("--out", type=Path, default=Path("runs/mini"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                        help="where assemble/evaluator/ship write and the stages read the base "
                             "(default: the shipped weights; another folder keeps them untouched)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from weights instead of from nothing: base, a pipeline folder "
                             "(e.g. the shipped base); stage 1 phases, an adapter folder")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of the vae, base, vision or evaluator phase (default: the phase's "
                             "own); the stage phases take the override train.learning_rate=...")
    parser.add_argument("--target-sizes", type=_probabilities, default=None, metavar="P1,P2,P3",
                        help="stage 1 phases: probabilities that a pair's target shows its subject at the "
                             "sizes of a 1-, 2- or 3-subject scene (default 1,0,0: lone-subject sizes, the "
                             "shipped set's data)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="stage phases: Trainer config overrides, e.g. 'model.adapter_kwargs={reference_query: true}'")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.overrides and args.phase not in STAGES:
        parser.error(f"config overrides apply to the stage phases ({', '.join(STAGES)}), not {args.phase}")
    if args.lr is not None and args.phase not in DEFAULT_STEPS:
        parser.error(f"--lr applies to the phases {', '.join(DEFAULT_STEPS)}; "
                     f"{args.phase} takes train.learning_rate=... or has no optimizer")
    if args.target_sizes is not None and args.phase not in ("stage1", "stage1_clip_only"):
        parser.error(f"--target-sizes applies to the stage 1 phases, not {args.phase}")
    if args.phase != "all":
        run_phase(args.phase, args.out, args.steps, args.minutes, args.init, args.weights, args.overrides, args.lr,
                  args.target_sizes)
        return
    for phase in PHASES:
        if phase in ("assemble", "ship", "calibrate") or not _finished(args.out / phase):
            run_phase(phase, args.out, weights=args.weights)


if __name__ == "__main__":
    main()
