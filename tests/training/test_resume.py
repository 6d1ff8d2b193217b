"""A run killed with SIGKILL resumes from its last complete checkpoint and ends with the
very same weights as an uninterrupted run (bitwise, CPU, one thread)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from conftest import CONFIGS, REPO
from shapes import pair_records, write_pair_manifest


def train_command(manifest: Path, output: Path, steps: int = 12) -> list[str]:
    return [
        sys.executable, "-m", "anystory.training", "train", "stage1", "--config", str(CONFIGS / "tiny_stage1.yaml"),
        f"data.manifest={manifest}", f"output.dir={output}", f"train.max_steps={steps}", "train.batch_size=3",
        "output.checkpoint_every=4", "output.checkpoints_total_limit=2", "output.progress_bar=false",
        "train.learning_rate=1e-3",
    ]


def run(command: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300).stderr


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    manifest = write_pair_manifest(tmp_path / "data", pair_records(10))  # 3 batches/epoch: resumes mid-epoch
    run(train_command(manifest, tmp_path / "straight"))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(train_command(manifest, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "checkpoint-00000004"
    deadline = time.time() + 240
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (killed / "adapter").exists(), "the run was not killed mid-training"
    # a checkpoint being written when the kill came is a temporary folder: it must be ignored
    (killed / "checkpoints" / ".tmp-checkpoint-00000008").mkdir(exist_ok=True)

    log = run(train_command(manifest, killed))
    assert "resumed from" in log and "checkpoint-0000000" in log  # not a fresh start (which would match too)

    straight = load_file(tmp_path / "straight" / "adapter" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(killed / "adapter" / "diffusion_pytorch_model.safetensors")
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not straight[k].equal(resumed[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-00000008", "checkpoint-00000012"]
