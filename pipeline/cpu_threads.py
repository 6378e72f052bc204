"""CPU threads that adapt to a busy machine: `train.cpu_threads: null` on a CPU.

torch runs each large op on all its threads and waits for the slowest. When another
CPU-bound process shares the cores, one of those threads keeps losing its core and every
op waits for it: on a 2-core machine a K = 10 training step went from ~70 ms to over a
second with 2 threads, while 1 thread kept its speed. On a quiet machine 2 threads are
~1.5x faster than 1. So the governor measures instead of guessing: now and then it times a
few steps with the other thread count and keeps the faster one: first after 5 steps, then
after every loss of the other setting twice as late (25, 50, 100, ... steps, at most 3200),
so a wrong setting costs a few steps, not an epoch.
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

PROBE_STEPS = 3  # steps timed with the other setting; the first one is not used
FIRST_PROBE = 5  # steps of the starting setting before the first probe
FIRST_INTERVAL, MAX_INTERVAL = 25, 3200
WINDOW = 20  # recent steps of the current setting, whose median is the reference
MARGIN = 0.9  # switch only to a setting at least 10% faster


class CPUThreadGovernor(pl.Callback):
    """Chooses between 1 and `max_threads` torch threads by timing training steps."""

    def __init__(self, max_threads: int, clock=time.perf_counter) -> None:
        self.clock = clock
        self.choices = (max_threads, 1)
        self.current = max_threads
        self.interval = FIRST_INTERVAL
        self.next_probe = FIRST_PROBE
        self.recent: list[float] = []  # step times of the current setting
        self.probing = False
        self.probe: list[float] = []  # step times of the other setting, while probing
        self._start = 0.0

    @property
    def other(self) -> int:
        return self.choices[1] if self.current == self.choices[0] else self.choices[0]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.set_num_threads(self.current)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        ready = len(self.recent) >= FIRST_PROBE
        if not self.probing and trainer.global_step >= self.next_probe and ready:
            torch.set_num_threads(self.other)
            self.probing, self.probe = True, []
        self._start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        seconds = self.clock() - self._start
        if not self.probing:
            self.recent = [*self.recent[-(WINDOW - 1) :], seconds]
            return
        self.probe.append(seconds)
        if len(self.probe) < PROBE_STEPS:
            return
        probe = statistics.median(self.probe[1:])  # the first step with new threads warms up
        reference = statistics.median(self.recent)
        if probe < MARGIN * reference:
            rank_zero_info(
                f"bihm: {self.other} torch thread(s) now run a step in {probe * 1e3:.0f} ms "
                f"against {reference * 1e3:.0f} ms with {self.current}; switching"
            )
            self.current, self.interval, self.recent = self.other, FIRST_INTERVAL, [probe]
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)
        torch.set_num_threads(self.current)
        self.next_probe = trainer.global_step + self.interval
        self.probing = False
