"""`Trainer`: both AnyStory training stages on HF accelerate.

One class runs either stage; they differ only in the trained parameter group and the
loss (see `AnyStoryObjective`). The engine is accelerate's: one CPU process, several
GPUs or nodes (`accelerate launch`), mixed precision, gradient accumulation, and
DeepSpeed ZeRO-1/2 or FSDP through accelerate's own config (the routed processors call
adapter submodules from inside the U-Net, so parameter-sharding modes that gather
weights per wrapped submodule, ZeRO-3 and auto-wrapped FSDP, are not supported).

Checkpoints go to `<output.dir>/checkpoints/checkpoint-<step>`, written to a temporary
folder first and renamed when complete, and hold the trainable weights, optimizer,
LR scheduler, EMA, every process's RNG states and the data position; a run restarted
with the same config resumes from the newest complete one. The final adapter goes to
`<output.dir>/adapter`, loadable with `AnyStoryAdapter.from_pretrained`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from tqdm.auto import tqdm

from ..models import AnyStoryAdapter
from ..pipelines import AnyStorySDXLPipeline
from .components import load_adapter, load_base_components
from .config import Config, ConfigError
from .data import ManifestSource, WebDatasetSource
from .loader import TrainingData
from .objective import AnyStoryObjective
from .transforms import SampleTransform, make_buckets
from .validation import ValidationSet

logger = logging.getLogger(__name__)

FROZEN_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainerState:
    """Progress that a checkpoint restores: optimizer steps, data position, skip count."""

    step: int = 0
    batches: int = 0  # batches consumed by each process (the data position)
    skipped: int = 0  # samples this process skipped as unusable

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Trainer:
    """Train stage 1 (subject encoder) or stage 2 (router) of an AnyStory adapter.

    `source` overrides the config's data (any Sequence/iterable of `Record`s, e.g. the
    mini world's); `components` overrides the base models (a dict as returned by
    `anystory.testing.tiny_sdxl_components`).
    """

    def __init__(
        self,
        config: Config,
        stage: int,
        source: Sequence | Iterable | None = None,
        components: dict | None = None,
    ):
        if stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {stage}")
        self.config, self.stage = config, stage
        self.output_dir = Path(config.output.dir)
        self.accelerator = self._make_accelerator()
        set_seed(config.train.seed)
        self.state = TrainerState()
        components = components if components is not None else load_base_components(config.model)
        self.adapter = load_adapter(config.model, components, stage)
        self.trainable = self._freeze_all_but_trained_group(components)
        self.pipeline = self._make_pipeline(components)
        self.objective = AnyStoryObjective(
            self.adapter, self.pipeline, stage,
            null_subject_probability=config.train.null_subject_probability,
            routing_loss_weight=config.train.routing_loss_weight,
            coarse_routing_loss_weight=config.train.coarse_routing_loss_weight,
            gumbel_tau=config.train.gumbel_tau,
            timestep_range=config.train.timestep_range,
            subject_loss_weight=config.train.subject_loss_weight,
            match_twins=config.train.match_twins,
            layout_routing=config.train.layout_routing,
            sample_latents=config.train.sample_latents,
        )
        self.optimizer = self._make_optimizer()
        self.lr_scheduler = get_scheduler(
            config.train.lr_scheduler, self.optimizer,
            num_warmup_steps=config.train.lr_warmup_steps, num_training_steps=config.train.max_steps,
        )
        self.objective, self.optimizer = self.accelerator.prepare(self.objective, self.optimizer)
        self.ema = EMAModel(self.trainable, decay=config.train.ema_decay) if config.train.ema else None
        self._register_checkpoint_state()
        source = source if source is not None else source_from_config(config)
        self.transform = self._make_transform()
        acc = self.accelerator
        self.data = TrainingData(
            source, self.transform, config.train.batch_size, config.train.seed,
            config.data.num_workers, acc.process_index, acc.num_processes,
        )
        self.validation = ValidationSet.from_source(source, stage, self.transform, config.output.validation_samples) if (
            config.output.validation_every and acc.is_main_process
        ) else None

    # -- setup -----------------------------------------------------------------------------------

    def _make_accelerator(self) -> Accelerator:
        train, output = self.config.train, self.config.output
        accumulation = train.gradient_accumulation_steps
        if train.total_batch_size is not None:
            per_step = train.batch_size * PartialState().num_processes
            if train.total_batch_size % per_step:
                raise ConfigError(
                    f"train.total_batch_size={train.total_batch_size} is not a multiple of batch_size x processes = {per_step}"
                )
            accumulation = train.total_batch_size // per_step
        tracker = None
        if output.report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401

                tracker = "tensorboard"
            except ImportError:
                logger.warning("tensorboard is not installed: loss curves are not logged (pip install tensorboard)")
        elif output.report_to not in ("none", None):
            tracker = output.report_to
        return Accelerator(
            gradient_accumulation_steps=accumulation,
            mixed_precision=train.mixed_precision,
            log_with=tracker,
            project_dir=str(self.output_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train.find_unused_parameters)],
        )

    def _freeze_all_but_trained_group(self, components: dict) -> list[torch.nn.Parameter]:
        """Everything frozen (U-Net first, before the adapter is attached), then the stage's group on."""
        for name in FROZEN_COMPONENTS:
            if components.get(name) is not None:
                components[name].requires_grad_(False)
        self.adapter.requires_grad_(False)
        trainable = self.adapter.subject_encoder_parameters() if self.stage == 1 else (
            self.adapter.router_context_parameters() if self.config.train.router_context_only
            else self.adapter.router_parameters())
        for parameter in trainable:
            parameter.requires_grad_(True)
        self.adapter.train()
        return trainable

    def _make_pipeline(self, components: dict) -> AnyStorySDXLPipeline:
        """The frozen parts in the compute dtype, on the device, with the adapter attached."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)
        device = self.accelerator.device
        for name in FROZEN_COMPONENTS:
            module = components.get(name)
            if module is not None:
                keep_fp32 = name == "vae" and dtype == torch.float16 and module.config.force_upcast
                target = torch.float32 if keep_fp32 else dtype
                module.to(device) if module.dtype == target else module.to(device, target)
        self.adapter.to(device)
        pipeline = AnyStorySDXLPipeline(**components, adapter=self.adapter)  # attaches the adapter
        pipeline.set_progress_bar_config(disable=True)
        if self.config.train.gradient_checkpointing:
            pipeline.unet.enable_gradient_checkpointing()
            if self.stage == 1 and self.adapter.reference_net is not None:
                self.adapter.reference_net.unet.enable_gradient_checkpointing()
        return pipeline

    def _make_optimizer(self) -> torch.optim.Optimizer:
        train = self.config.train
        return torch.optim.AdamW(
            self.trainable, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
        )

    def _make_transform(self) -> SampleTransform:
        data = self.config.data
        extractor = self.pipeline.feature_extractor
        buckets = make_buckets(data.resolution, data.bucket_step, data.bucket_max_ratio) if data.bucketing else [
            (data.resolution, data.resolution)
        ]
        return SampleTransform(
            buckets=buckets,
            clip_size=extractor.crop_size["height"],
            clip_mean=list(extractor.image_mean),
            clip_std=list(extractor.image_std),
            reference_size=self.adapter.config.reference_size,
            max_subjects=self._subjects_per_sample(),
            min_instance_fraction=data.min_instance_fraction,
            random_crop=data.random_crop,
            random_flip=data.random_flip,
            rotation_degrees=data.rotation_degrees,
            scale_range=data.scale_range,
            shift_fraction=data.shift_fraction,
            caption_dropout=data.caption_dropout,
        )

    def _subjects_per_sample(self) -> int:
        """The paper's stage 1 sees one subject per target; stage 2, and stage 1 with
        `layout_routing`, as many as the data and the adapter allow."""
        if self.stage == 1 and not self.config.train.layout_routing:
            return 1
        return min(self.config.data.max_subjects, self.adapter.config.max_subjects)

    # -- checkpoints --------------------------------------------------------------------------------

    def _trainable_names(self, model: torch.nn.Module) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def _register_checkpoint_state(self) -> None:
        acc = self.accelerator
        acc.register_for_checkpointing(self.state, self.lr_scheduler, *([self.ema] if self.ema else []))

        def keep_trainable_weights(models, weights, output_dir):
            for i, model in enumerate(models):
                names = self._trainable_names(model)
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

        def check_trainable_weights(models, input_dir):
            path = Path(input_dir) / "model.safetensors"
            if not path.exists():
                return
            with safe_open(path, framework="pt") as f:
                found = set(f.keys())
            missing = sorted(self._trainable_names(models[0]) - found)
            if missing:
                raise RuntimeError(f"checkpoint {input_dir} lacks {len(missing)} trained weights, e.g. {missing[:3]}")

        acc.register_save_state_pre_hook(keep_trainable_weights)
        acc.register_load_state_pre_hook(check_trainable_weights)

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (incomplete ones are temporary folders, ignored)."""
        if not self.checkpoint_root.is_dir():
            return None
        done = [p for p in self.checkpoint_root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()]
        return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)

    def save_checkpoint(self) -> Path:
        """Write to a temporary folder on every process, then rename it in one step."""
        acc = self.accelerator
        final = self.checkpoint_root / f"{CHECKPOINT_PREFIX}{self.state.step:08d}"
        temporary = self.checkpoint_root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(temporary))
        acc.wait_for_everyone()
        if acc.is_main_process:
            _fsync_tree(temporary)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.config.output.checkpoints_total_limit
        if not self.checkpoint_root.is_dir():
            return
        for stale in self.checkpoint_root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if limit:
            done = sorted(p for p in self.checkpoint_root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))
            for old in done[:-limit]:
                shutil.rmtree(old)

    def resume(self) -> Path | None:
        """Load the checkpoint that `output.resume` names (auto: the newest, if any)."""
        choice = self.config.output.resume
        if choice == "none":
            return None
        path = self.latest_checkpoint() if choice == "auto" else Path(choice)
        if path is None:
            return None
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        self.accelerator.load_state(str(path), strict=False)
        logger.info("resumed from %s at step %d", path, self.state.step)
        return path

    def export(self) -> Path:
        """Save the adapter (EMA weights if EMA is on) to `<output.dir>/adapter`, atomically."""
        acc = self.accelerator
        adapter: AnyStoryAdapter = acc.unwrap_model(self.objective).adapter
        if self.stage == 2:
            adapter.register_to_config(router_trained=True)
        target = self.output_dir / "adapter"
        if self.ema:
            self.ema.store(self.trainable)
            self.ema.copy_to(self.trainable)
        if acc.is_main_process:
            temporary = self.output_dir / ".tmp-adapter"
            shutil.rmtree(temporary, ignore_errors=True)
            adapter.save_pretrained(temporary)
            _fsync_tree(temporary)
            if target.exists():
                shutil.rmtree(target)
            os.replace(temporary, target)
        if self.ema:
            self.ema.restore(self.trainable)
        acc.wait_for_everyone()
        return target

    # -- the loop -------------------------------------------------------------------------------------

    def step_generator(self) -> torch.Generator:
        """Randomness of one batch (noise, timesteps, condition dropping), a function of
        (seed, process, data position): the same after a resume, with no state to save."""
        seed = np.random.SeedSequence([self.config.train.seed, self.accelerator.process_index, self.state.batches])
        return torch.Generator().manual_seed(int(seed.generate_state(1)[0]))

    def train(self) -> Path:
        """Run to `train.max_steps` (resuming if a checkpoint exists) and export the adapter."""
        acc, train, output = self.accelerator, self.config.train, self.config.output
        self.resume()
        if acc.is_main_process:
            self._prune_checkpoints()
        acc.init_trackers(f"anystory-stage{self.stage}", config=_flat(self.config.to_dict()))
        progress = tqdm(
            total=train.max_steps, initial=self.state.step, desc=f"stage {self.stage}",
            disable=not (acc.is_main_process and output.progress_bar), dynamic_ncols=True,
        )
        window: dict[str, list[float]] = defaultdict(list)
        batches = self.data.batches(start=self.state.batches)
        last_good = None
        while self.state.step < train.max_steps:
            batch = next(batches)
            self.state.batches += 1
            self._count_skipped(batch["skipped"])
            weight = 1.0
            if "pixel_values" not in batch:  # every sample failed: keep processes in step with a zero-weight batch
                if last_good is None:
                    continue
                batch, weight = last_good, 0.0
            last_good = batch
            record = self.stage == 2 and (self.state.step + 1) % output.log_every == 0
            with acc.accumulate(self.objective):
                losses = self.objective(batch, generator=self.step_generator(), record_maps=record)
                acc.backward(losses["loss"] * weight)
                if acc.sync_gradients and train.max_grad_norm:
                    acc.clip_grad_norm_(self.trainable, train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in losses.items():
                window[key].append(value.item())
            if not acc.sync_gradients:
                continue
            self.lr_scheduler.step()
            self.state.step += 1
            if self.ema:
                self.ema.step(self.trainable)
            progress.update(1)
            self._periodic(window, progress)
        progress.close()
        if self.latest_checkpoint() is None or self.latest_checkpoint().name != f"{CHECKPOINT_PREFIX}{self.state.step:08d}":
            self.save_checkpoint()
        path = self.export()
        acc.end_training()
        return path

    def _periodic(self, window: dict[str, list[float]], progress) -> None:
        step, output = self.state.step, self.config.output
        if step % output.log_every == 0 or step == self.config.train.max_steps:
            metrics = self._reduce_window(window)
            metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
            self.accelerator.log(metrics, step=step)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", skipped=int(metrics["skipped_samples"]))
            window.clear()
        if step % output.checkpoint_every == 0:
            self.save_checkpoint()
        if output.validation_every and step % output.validation_every == 0:
            self.validate()

    def _reduce_window(self, window: dict[str, list[float]]) -> dict[str, float]:
        """Means over the logging window, averaged over processes (IoU only where it was recorded)."""
        keys = sorted(window)
        values = torch.tensor([float(np.mean(window[k])) if window[k] else 0.0 for k in keys] + [float(self.state.skipped)])
        values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean").cpu()
        metrics = dict(zip(keys, values[:-1].tolist()))
        metrics["skipped_samples"] = values[-1].item() * self.accelerator.num_processes
        return metrics

    def _count_skipped(self, reasons: list[str]) -> None:
        for reason in reasons:
            self.state.skipped += 1
            logger.warning("skipped sample (%d so far on process %d): %s", self.state.skipped, self.accelerator.process_index, reason)

    def validate(self) -> Path | None:
        """Validation images (with routing-map overlays in stage 2), saved and logged."""
        if self.validation is None:
            return None
        data, output = self.config.data, self.config.output
        with self.accelerator.autocast():
            rendered = self.validation.render(
                self.pipeline, self.output_dir / "validation", self.state.step, data.resolution,
                output.validation_inference_steps, output.validation_guidance_scale,
            )
        if rendered is None:
            return None
        path, grid = rendered
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": np.asarray(grid)[None]}, step=self.state.step, dataformats="NHWC")
        return path


def source_from_config(config: Config):
    """The record source that `data.manifest` or `data.shards` names."""
    data = config.data
    if (data.manifest is None) == (data.shards is None):
        raise ConfigError("set exactly one of data.manifest (JSONL) and data.shards (WebDataset tars)")
    if data.manifest is not None:
        return ManifestSource(data.manifest)
    return WebDatasetSource(data.shards, seed=config.train.seed, shuffle_buffer=data.shuffle_buffer)


def _fsync_tree(folder: Path) -> None:
    """Flush a finished folder's files to disk before it is renamed into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested config -> flat {section/key: scalar} for tracker hyperparameters."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}/"))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
