"""Training of both AnyStory stages (DESIGN §1 "Training"); see README.md in this folder."""

from .config import Config, ConfigError, load_config
from .data import ManifestError, ManifestSource, Record, SampleError, WebDatasetSource
from .loader import TrainingData
from .objective import AnyStoryObjective, routing_iou
from .transforms import SampleTransform, make_buckets
from .trainer import Trainer, TrainerState

__all__ = [
    "AnyStoryObjective", "Config", "ConfigError", "ManifestError", "ManifestSource", "Record",
    "SampleError", "SampleTransform", "Trainer", "TrainerState", "TrainingData", "WebDatasetSource",
    "load_config", "make_buckets", "routing_iou",
]
