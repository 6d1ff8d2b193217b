"""A resumable, time-budgeted training loop shared by every mini-world phase.

A phase owns its models and loss; `ResumableRun` owns everything a killed run needs to
continue exactly where it stopped: step, elapsed training time, model and EMA weights,
optimizer state and the random generator, written atomically (temporary file, then
`os.replace`) every few minutes. Data comes from map-style world datasets indexed by
step, so no data-loader state is needed.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

CHECKPOINT_NAME = "checkpoint.pt"


def batch_at(dataset: Dataset, step: int, batch_size: int) -> dict:
    """The batch of `step`: items [step * batch_size, (step + 1) * batch_size)."""
    start = step * batch_size
    return default_collate([dataset[i] for i in range(start, start + batch_size)])


class ResumableRun:
    """Optimizer stepping, warmup, EMA, logging, time budget and atomic checkpoints.

    The run stops after `max_steps` steps or `minutes` of accumulated training time
    (across restarts), whichever comes first; steps are the reproducible budget, since
    speed depends on what else the machine runs.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        *,
        max_steps: int | None = None,
        minutes: float | None = None,
        seed: int = 0,
        warmup_steps: int = 100,
        ema_decay: float | None = 0.999,
        grad_clip: float = 1.0,
        checkpoint_minutes: float = 3.0,
        log_every: int = 50,
        name: str = "",
    ) -> None:
        self.directory = Path(directory)
        self.modules, self.optimizer = modules, optimizer
        self.minutes, self.max_steps = minutes, max_steps
        self.warmup_steps, self.ema_decay, self.grad_clip = warmup_steps, ema_decay, grad_clip
        self.checkpoint_seconds, self.log_every = checkpoint_minutes * 60, log_every
        self.name = name or self.directory.name
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(seed)
        self.ema = (
            {key: copy.deepcopy(m).requires_grad_(False) for key, m in modules.items()}
            if ema_decay is not None else None
        )
        self.step, self.elapsed = 0, 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        if self.path.exists():
            self._load()
        self._clock = self._last_save = time.monotonic()

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_NAME

    @property
    def done(self) -> bool:
        if self.max_steps is None and self.minutes is None:
            raise ValueError(f"{self.name}: give max_steps or minutes, or the run never ends")
        return (self.max_steps is not None and self.step >= self.max_steps) or (
            self.minutes is not None and self.elapsed >= self.minutes * 60
        )

    def optimize(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss`, then bookkeeping (EMA, log, checkpoint)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss is {loss.item()} at step {self.step}")
        warmup = min(1.0, (self.step + 1) / self.warmup_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * warmup
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        self._loss_sum, self._loss_count = self._loss_sum + loss.item(), self._loss_count + 1
        now = time.monotonic()
        self.elapsed, self._clock = self.elapsed + now - self._clock, now
        if self.step % self.log_every == 0:
            self._log()
        if now - self._last_save >= self.checkpoint_seconds:
            self.save()

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for key, module in self.modules.items():
                for ema_p, p in zip(self.ema[key].parameters(), module.parameters()):
                    ema_p.lerp_(p, 1 - decay)

    def final(self, key: str) -> nn.Module:
        """The module to ship: its EMA copy when EMA is on."""
        return (self.ema or self.modules)[key]

    def _log(self) -> None:
        mean = self._loss_sum / max(self._loss_count, 1)
        rate = self.elapsed / max(self.step, 1)
        print(
            f"[{self.name}] step {self.step}/{self.max_steps} loss {mean:.4f} "
            f"{rate:.3f} s/step elapsed {self.elapsed / 60:.1f} min",
            flush=True,
        )
        self._loss_sum, self._loss_count = 0.0, 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "modules": {key: m.state_dict() for key, m in self.modules.items()},
            "ema": {key: m.state_dict() for key, m in (self.ema or {}).items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def save(self) -> None:
        """Write the checkpoint atomically: a reader never sees a half-written file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, self.path)
        self._last_save = time.monotonic()
        print(f"[{self.name}] checkpoint at step {self.step} -> {self.path}", flush=True)

    def _load(self) -> None:
        state = torch.load(self.path, weights_only=True)
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        for key, module in (self.ema or {}).items():
            module.load_state_dict(state["ema"][key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        print(f"[{self.name}] resumed at step {self.step} ({self.elapsed / 60:.1f} min)", flush=True)

