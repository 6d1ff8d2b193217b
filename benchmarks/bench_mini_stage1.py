"""Stage-1 throughput on the mini world's own weights, by batch size and precision.

The recipe's wall time is its stage-1 and base steps, so this asks what a step costs and
which settings buy samples per second: the shipped stage-1 settings (batch 16, fp32) are
the baseline, measured in the same run. Batch sizes share a process, rounds interleaved
so that machine load hits them alike; each precision runs in a child process of its own
(accelerate fixes one precision per process), one after the other. Each step is the
Trainer's own: encodings, forward under the accelerator's autocast, backward and AdamW,
on a batch of the world's pairs collated once.

    python benchmarks/bench_mini_stage1.py --threads 2 --batches 16,64 --precisions no,bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import time_modes  # noqa: E402

from anystory.mini.stages import BASE_WEIGHTS, PairRecords, stage_config  # noqa: E402
from anystory.training import Trainer  # noqa: E402
from anystory.training.config import config_from_dict  # noqa: E402
from anystory.training.transforms import collate  # noqa: E402

ADAPTER = BASE_WEIGHTS.parent / "adapter"


def stage1_runner(batch_size: int, precision: str, output: str, records: PairRecords):
    """(step function, batch) of a stage-1 Trainer on the shipped base and adapter."""
    raw = stage_config("stage1", Path(output), init_adapter=ADAPTER)
    raw["train"].update(batch_size=batch_size, mixed_precision=precision)
    raw["output"]["progress_bar"] = False
    trainer = Trainer(config_from_dict(raw), 1, source=records)
    batch = collate([trainer.transform(records[i], np.random.default_rng(i)) for i in range(batch_size)])

    def step(batch, generator):
        with trainer.accelerator.autocast():
            loss = trainer.objective(batch, generator=generator)["loss"]
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, batch


def measure(batches: list[int], precision: str, args) -> dict[int, float]:
    """Median seconds per step of each batch size, at one precision (this process's)."""
    records = PairRecords()
    with tempfile.TemporaryDirectory() as output:
        runners = {b: stage1_runner(b, precision, f"{output}/{b}", records) for b in batches}
        return time_modes(runners, args.rounds, args.steps, args.warmup)


def in_child(precision: str, args) -> dict[int, float]:
    command = [sys.executable, __file__, "--child", precision, *(f"--{k}={v}" for k, v in vars(args).items() if k != "child")]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return {int(b): s for b, s in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="16,64", help="comma-separated batch sizes; the first is the baseline's")
    parser.add_argument("--precisions", default="no,bf16", help="train.mixed_precision values; the first is the baseline's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per mode per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        return print(json.dumps(measure(batches, args.child, args)))
    precisions = args.precisions.split(",")
    seconds = {p: in_child(p, args) for p in precisions}
    baseline = batches[0] / seconds[precisions[0]][batches[0]]
    print(f"mini world stage 1 on the shipped base and adapter, cpu ({args.threads} thread(s)); "
          f"median of {args.rounds} rounds x {args.steps} steps")
    for p, per_batch in seconds.items():
        for b, s in per_batch.items():
            rate = b / s
            print(f"batch {b:3d}  {p:4s}  {s:6.3f} s/step  {rate:7.1f} samples/s  {rate / baseline:5.2f}x baseline")


if __name__ == "__main__":
    main()
