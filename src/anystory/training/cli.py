"""`anystory train stage1|stage2 --config FILE [section.key=value ...]`.

Single process: `python -m anystory.training train stage1 --config configs/train/tiny_stage1.yaml`.
Several processes or GPUs: `accelerate launch [--num_processes N] -m anystory.training train ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .data import ManifestError
from .trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anystory", description="Train AnyStory adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train stage 1 (subject encoder) or stage 2 (router)")
    train.add_argument("stage", choices=["stage1", "stage2"])
    train.add_argument("--config", required=True, help="YAML config (see configs/train/)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.max_steps=100")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), train, print the exported adapter's path."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow --config
    unknown = [token for token in extra if "=" not in token or token.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = args.overrides + extra
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides)
        trainer = Trainer(config, stage=int(args.stage[-1]))
        adapter = trainer.train()
    except (ConfigError, ManifestError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(f"adapter saved to {adapter}")
    return 0
