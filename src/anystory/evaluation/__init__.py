"""Real-scale evaluation: the DreamBench protocol (DINO, CLIP-I, CLIP-T) of UNO's Table 1."""

from .dreambench import (
    BenchCase,
    BenchScores,
    BenchSubject,
    DreamBench,
    DreamBenchError,
    PromptsAndClasses,
    evaluate,
    fill_prompt,
    format_table,
    load_groups,
)
from .metrics import MetricModelError, MetricModels

__all__ = [
    "BenchCase",
    "BenchScores",
    "BenchSubject",
    "DreamBench",
    "DreamBenchError",
    "MetricModelError",
    "MetricModels",
    "PromptsAndClasses",
    "evaluate",
    "fill_prompt",
    "format_table",
    "load_groups",
]
