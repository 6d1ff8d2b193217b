"""Training configuration: nested dataclasses, read from YAML, overridden with `key=value`.

A config file has four sections (`model`, `data`, `train`, `output`); every key is a
field below, so a typo is an error that names the key instead of a silently ignored
setting. `configs/train/*.yaml` are the shipped examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the reason."""


@dataclass
class ModelConfig:
    base: str = "tiny"  # SDXL diffusers folder or single-file checkpoint, or "tiny" (tests)
    base_config: str | None = None  # local SDXL folder giving configs for a single-file base
    image_encoder: str | None = None  # CLIP vision encoder folder (not needed for "tiny")
    adapter: str | None = None  # adapter folder to start from (stage 2: the stage-1 export)
    adapter_kwargs: dict = field(default_factory=dict)  # AnyStoryAdapter.from_unet options (fresh stage 1)
    add_router_context: int = 0  # stage 2: router_context convolutions added to the loaded adapter
    seed: int = 0  # weights seed of the "tiny" components


@dataclass
class DataConfig:
    manifest: str | None = None  # JSONL manifest (see training/README.md)
    shards: str | list[str] | None = None  # WebDataset tar shards, brace patterns allowed
    resolution: int = 1024  # target side (square) or bucket pixel area = resolution**2
    bucketing: bool = True  # aspect-ratio buckets of ~resolution**2 pixels
    bucket_step: int = 64  # bucket sides are multiples of this
    bucket_max_ratio: float = 2.0  # longest bucket side / shortest side
    random_crop: bool = True  # else centre crop
    random_flip: bool = False  # flips the target only (captions may say left/right)
    max_subjects: int = 4  # stage 2: instances used as references per image
    min_instance_fraction: float = 0.01  # stage 2: smaller instances are not used
    rotation_degrees: float = 15.0  # reference augmentation: rotation in [-d, d]
    scale_range: tuple[float, float] = (0.7, 1.2)  # < 1 zero-pads around the subject, > 1 crops into it
    shift_fraction: float = 0.1  # random translation of the reference, fraction of its side
    caption_dropout: float = 0.0  # the paper drops only the subject condition
    num_workers: int = 0
    shuffle_buffer: int = 1000  # WebDataset only


@dataclass
class TrainConfig:
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    total_batch_size: int | None = None  # if set: accumulation = total / (batch_size * processes)
    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    null_subject_probability: float = 0.1  # stage 1: CLIP condition -> null embedding
    routing_loss_weight: float = 0.1  # stage 2: lambda of Eq. 4
    coarse_routing_loss_weight: float = 0.0  # stage 2: optional supervision of the coarse maps
    gumbel_tau: float = 1.0  # stage 2: straight-through Gumbel-softmax temperature
    timestep_range: tuple[int, int] | None = None  # [low, high) of the sampled timesteps; None: all
    subject_loss_weight: float = 0.0  # extra diffusion-loss weight on subject pixels; 0: the paper's plain loss
    match_twins: bool = False  # stage 2: same-group subjects (Record.subject_groups) may trade masks in L_route
    layout_routing: bool = False  # stage 1: up to data.max_subjects subjects, each routed to its target mask
    router_context_only: bool = False  # stage 2: train only the router_context convolutions, on a trained router
    sample_latents: bool = True  # target latents: a posterior sample (usual) or its mode (random test VAEs)
    find_unused_parameters: bool = True  # DDP: the ReferenceNet's tail after its last capture gets no gradient
    seed: int = 0


@dataclass
class OutputConfig:
    dir: str = "runs/anystory"
    resume: str = "auto"  # auto (latest checkpoint in dir, if any) | none | a checkpoint folder
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | none
    progress_bar: bool = True
    validation_every: int = 0  # 0: never
    validation_samples: int = 2
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults) and apply `section.key=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; expected {sorted(sections)}")
    built = {}
    for f in dataclasses.fields(Config):
        built[f.name] = _build_section(f.default_factory, raw.get(f.name) or {}, f.name)
    return Config(**built)


def _build_section(cls, values: dict, name: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in section '{name}': {unknown}; known keys: {sorted(known)}")
    defaults = cls()
    for key, value in values.items():
        default = getattr(defaults, key)
        if isinstance(default, tuple) and isinstance(value, list):
            values[key] = tuple(value)
        elif isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            values[key] = _to_float(value, f"{name}.{key}")  # YAML reads "1e-4" as a string
        elif isinstance(default, str) and isinstance(value, bool):
            values[key] = "yes" if value else "no"  # YAML 1.1 reads `mixed_precision: no` as False
    section = cls(**values)
    _check_choices(section, name)
    return section


# String keys with a closed set of values, checked here rather than deep inside accelerate.
CHOICES = {("train", "mixed_precision"): ("no", "fp16", "bf16")}


def _check_choices(section, name: str) -> None:
    for (section_name, key), allowed in CHOICES.items():
        if section_name == name and getattr(section, key) not in allowed:
            raise ConfigError(f"config key {name}.{key} must be one of {list(allowed)}, got {getattr(section, key)!r}")


def _to_float(value, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"config key {key} must be a number, got {value!r}") from None


def apply_override(raw: dict, override: str) -> None:
    """`train.max_steps=10` -> raw["train"]["max_steps"] = 10 (the value is parsed as YAML);
    a mapping merges into a mapping (`model.adapter_kwargs={max_subjects: 4}` sets one key)."""
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.max_steps=100)")
    section, name = parts
    try:
        parsed: Any = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"config section '{section}' must be a mapping")
    if isinstance(parsed, dict) and isinstance(target.get(name), dict):
        parsed = {**target[name], **parsed}
    target[name] = parsed
