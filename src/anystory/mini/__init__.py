"""The mini world: AnyStory's whole setting in miniature, trainable on a CPU (DESIGN §3)."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"


def load_pipeline(adapter: str = "adapter", weights: Path = WEIGHTS_DIR, torch_dtype: torch.dtype = torch.float32):
    """The bundled mini-world `AnyStorySDXLPipeline`: base models + a trained adapter
    (`"adapter"`, or `"adapter_clip_only"` for the paper's CLIP-only ablation, inside
    `weights`; or an adapter folder elsewhere, such as a training run's export)."""
    from ..pipelines import AnyStorySDXLPipeline

    base, folder = weights / "base", weights / adapter
    if not (folder / "config.json").exists() and (Path(adapter) / "config.json").exists():
        folder = Path(adapter)  # a path of its own, relative to the working directory
    if not (folder / "config.json").exists() or not (base / "model_index.json").exists():
        raise FileNotFoundError(
            f"the mini world's weights ({base}, {folder}) are missing; train them with "
            "`python -m anystory.mini.recipe --phase all`"
        )
    return AnyStorySDXLPipeline.from_base(base, folder, base / "image_encoder", torch_dtype=torch_dtype)
