"""Training throughput of AnyStory's two stages vs a plain U-Net fine-tuning step (DESIGN §4).

On the tiny SDXL-shaped components, same batch size and resolution, measured side by
side in one process (rounds interleave the three modes, so machine load hits all alike):
- plain: a diffusers-style U-Net fine-tuning step (all U-Net weights trained, no subjects);
- stage 1: AnyStory stage 1 (subject QFormer, ReferenceNet, K/V projections; 1 subject);
- stage 2: AnyStory stage 2 (router; 2 subjects per sample, Gumbel routing, L_route).
Targets are 64 px and references 32 px, the paper's 2:1 (1024 vs 512).
Each step = frozen encodings + forward + backward + AdamW step, data already collated.
Peak memory: CUDA max allocated per mode; on CPU the peak RSS of a process that runs
only that mode (setup included; with tiny models the setup dominates it).

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --batch 8 --rounds 5 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "training"))
from shapes import pair_records, scene_records  # noqa: E402

from anystory.testing import tiny_sdxl_components  # noqa: E402
from anystory.training import Trainer, load_config  # noqa: E402
from anystory.pipelines.components import vae_latents  # noqa: E402
from anystory.training.transforms import collate  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
MODES = ("plain", "stage1", "stage2")


def make_trainer(stage: int, output: str, resolution: int) -> Trainer:
    overrides = [f"output.dir={output}", "output.progress_bar=false", f"data.resolution={resolution}"]
    config = load_config(CONFIGS / f"tiny_stage{stage}.yaml", overrides)
    source = pair_records(64) if stage == 1 else scene_records(64)
    return Trainer(config, stage, source=source)


class PlainFineTuning:
    """The baseline: a plain SDXL U-Net fine-tuning step on the same tiny components."""

    def __init__(self, reference: Trainer):
        components = tiny_sdxl_components(0)
        self.unet, self.pipeline = components["unet"].to(reference.accelerator.device), reference.pipeline
        self.unet.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.scheduler = reference.objective.noise_scheduler

    def step(self, batch: dict, generator: torch.Generator) -> None:
        pipe, device = self.pipeline, self.unet.device
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(batch["captions"], device=device, do_classifier_free_guidance=False)
            latents = vae_latents(pipe.vae, batch["pixel_values"], generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator).to(device)
        prediction = self.unet(
            self.scheduler.add_noise(latents, noise, timesteps), timesteps, embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"].to(device)},
        ).sample
        F.mse_loss(prediction, noise).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build(modes, batch_size: int, resolution: int, output: str) -> dict:
    """mode -> (step function, batch)."""
    trainers = {
        stage: make_trainer(stage, f"{output}/stage{stage}", resolution)
        for stage in (1, 2) if f"stage{stage}" in modes or stage == 1
    }
    runners = {}
    for stage, trainer in trainers.items():
        records = pair_records(batch_size) if stage == 1 else scene_records(batch_size)
        batch = collate([trainer.transform(r, np.random.default_rng(i)) for i, r in enumerate(records)])

        def step(batch, generator, trainer=trainer):
            trainer.objective(batch, generator=generator)["loss"].backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        runners[f"stage{stage}"] = (step, batch)
    if "plain" in modes:
        runners["plain"] = (PlainFineTuning(trainers[1]).step, runners["stage1"][1])
    return {mode: runners[mode] for mode in modes}


def time_modes(runners: dict, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each mode over interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    for step, batch in runners.values():
        for _ in range(warmup):
            step(batch, generator)
    times = {mode: [] for mode in runners}
    for _ in range(rounds):
        for mode, (step, batch) in runners.items():
            _sync()
            start = time.perf_counter()
            for _ in range(steps):
                step(batch, generator)
            _sync()
            times[mode].append((time.perf_counter() - start) / steps)
    return {mode: float(np.median(t)) for mode, t in times.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb(mode: str, batch_size: int, resolution: int, steps: int) -> float:
    """CUDA: max allocated during the mode's steps. CPU: peak RSS of a child running only it."""
    if torch.cuda.is_available():
        with tempfile.TemporaryDirectory() as output:
            step, batch = build([mode], batch_size, resolution, output)[mode]
            torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                step(batch, torch.Generator().manual_seed(0))
            return torch.cuda.max_memory_allocated() / 2**20
    command = [
        sys.executable, __file__, "--child", mode, "--batch", str(batch_size), "--resolution", str(resolution), "--steps", str(steps)
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def child(mode: str, batch_size: int, resolution: int, steps: int) -> None:
    """Run one mode alone and print the process's peak RSS (setup included, alike for all modes)."""
    with tempfile.TemporaryDirectory() as output:
        step, batch = build([mode], batch_size, resolution, output)[mode]
        for _ in range(steps):
            step(batch, torch.Generator().manual_seed(0))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64, help="target side; references stay 32 px (SDXL: 1024 vs 512)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per mode per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.resolution, args.steps)
    with tempfile.TemporaryDirectory() as output:
        seconds = time_modes(build(MODES, args.batch, args.resolution, output), args.rounds, args.steps, args.warmup)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} thread(s))"
    print(
        f"device {device}, batch {args.batch}, {args.resolution}px targets, 32px references, tiny SDXL-shaped U-Net; "
        f"median of {args.rounds} rounds x {args.steps} steps; memory: "
        + ("CUDA max allocated" if torch.cuda.is_available() else "peak RSS of a process running only that mode")
    )
    aims = {"stage1": 0.45, "stage2": 0.70}
    for mode in MODES:
        rate = args.batch / seconds[mode]
        ratio = seconds["plain"] / seconds[mode]
        aim = f"  (aim >= {aims[mode]:.2f}x: {'met' if ratio >= aims[mode] else 'NOT met'})" if mode in aims else ""
        memory = peak_memory_mb(mode, args.batch, args.resolution, max(args.warmup, 2))
        print(f"{mode:7s} {rate:8.2f} samples/s  {ratio:5.2f}x plain{aim}  peak memory {memory:7.1f} MB")


if __name__ == "__main__":
    main()
