"""The CPU thread governor keeps whichever thread count runs training steps faster."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.cpu_threads import FIRST_PROBE, CPUThreadGovernor


class FakeClock:
    """Each step costs what the current torch thread count costs on the simulated machine."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost, self.now, self.running = cost, 0.0, False

    def __call__(self) -> float:
        if self.running:  # the end of a step: it took the cost of the current threads
            self.now += self.cost[torch.get_num_threads()]
        self.running = not self.running
        return self.now


def run_steps(governor: CPUThreadGovernor, trainer, steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        governor.on_train_batch_start(trainer, None, None, 0)
        used.append(torch.get_num_threads())
        governor.on_train_batch_end(trainer, None, None, None, 0)
        trainer.global_step += 1
    return used


def test_switches_to_one_thread_on_a_busy_machine_and_back_when_it_is_quiet():
    before = torch.get_num_threads()
    try:
        clock = FakeClock({2: 1.0, 1: 0.07})  # busy: 2 threads collapse
        governor = CPUThreadGovernor(2, clock=clock)
        trainer = SimpleNamespace(global_step=0)
        governor.on_train_start(trainer, None)
        used = run_steps(governor, trainer, 200)
        assert used[:FIRST_PROBE] == [2] * FIRST_PROBE
        switch = used.index(1)
        # Right after the first probe; later probes of 2 threads lose and are spaced out.
        assert switch == FIRST_PROBE and used[switch:].count(2) <= 12
        clock.cost = {2: 0.04, 1: 0.07}  # quiet again: 2 threads are faster
        used = run_steps(governor, trainer, 2000)
        assert used[-1] == 2 and used[-200:].count(1) <= 3
        # Found again at the next probe (the busy phase had spaced them out to ~200 steps);
        # after that, losing probes cost 3 steps each and back off.
        assert used.count(1) < 0.15 * len(used)
    finally:
        torch.set_num_threads(before)
