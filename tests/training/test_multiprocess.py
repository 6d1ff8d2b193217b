"""Two CPU processes (torch.distributed, gloo) run a few steps of each stage.

`accelerate launch --cpu` starts a single process (multi-CPU needs MPI there), so the
processes are started with torchrun, which accelerate picks up (ACCELERATE_USE_CPU=true).
"""

import os
import subprocess
import sys

import pytest

from conftest import CONFIGS, REPO
from shapes import pair_records, scene_records, write_pair_manifest, write_scene_manifest


@pytest.mark.parametrize("stage", [1, 2])
def test_two_cpu_processes_train_a_few_steps(tmp_path, stage):
    if stage == 1:
        manifest = write_pair_manifest(tmp_path / "data", pair_records(8))
    else:
        manifest = write_scene_manifest(tmp_path / "data", scene_records(8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + stage),
        "-m", "anystory.training", "train", f"stage{stage}", "--config", str(CONFIGS / f"tiny_stage{stage}.yaml"),
        f"data.manifest={manifest}", f"output.dir={tmp_path / 'run'}", "train.max_steps=3", "train.batch_size=2",
        "train.gradient_accumulation_steps=2", "output.checkpoint_every=2", "output.progress_bar=false",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000003"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    assert (tmp_path / "run" / "adapter" / "diffusion_pytorch_model.safetensors").exists()
    assert result.stdout.count("adapter saved to") == 1  # the main process exports
