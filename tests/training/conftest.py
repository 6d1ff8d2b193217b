import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the shapes helper module

from anystory.testing import tiny_sdxl_components  # noqa: E402
from anystory.training import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "train"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny_config(stage: int, output_dir, *overrides: str):
    """The shipped tiny config, quiet, writing to `output_dir`."""
    return load_config(
        CONFIGS / f"tiny_stage{stage}.yaml",
        [f"output.dir={output_dir}", "output.progress_bar=false", "output.report_to=none", *overrides],
    )


def calibrated_tiny_components(seed: int = 0) -> dict:
    """Tiny components whose random VAE gives unit-variance latents, as SDXL's scaling
    factor does for its trained VAE (the random VAE's latents have std ~0.19 and a
    posterior std ~1, so train with the posterior mode: `train.sample_latents=false`)."""
    components = tiny_sdxl_components(seed)
    components["vae"].register_to_config(scaling_factor=5.0)
    return components
