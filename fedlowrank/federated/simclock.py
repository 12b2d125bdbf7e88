"""Simulated wall-clock of a federated run under the configured device population: each sampled
client's time from the FLOPs of its local training (counted on the model it was sent, times the
examples it processes, both known to the server) and the bytes it moved; stragglers past the deadline
are dropped. Nothing here comes from a client's own report."""
from __future__ import annotations

import math

from fedlowrank.config import FederatedRun
from fedlowrank.lowrank import count_flops, state_bytes

from .aggregation import State
from .devices import client_time, round_clock


class SimClock:
    def __init__(self, run: FederatedRun, sizes: list[int] | None) -> None:
        self.run, self.sizes = run, sizes
        self.population = run.fed.device_population()
        self.cfg = run.fed.devices
        self.elapsed = 0.0  # simulated seconds since the start of training
        self._per_example: dict[tuple, float] = {}

    @property
    def active(self) -> bool:
        return self.population is not None

    def examples(self, pid: int) -> int:
        """Training examples client ``pid`` processes in a round (epochs or capped steps over its partition)."""
        f = self.run.fed
        n = self.sizes[pid] if self.sizes is not None else 0
        steps = f.local_epochs * math.ceil(n / f.batch_size)
        if f.local_steps is not None:
            steps = min(steps, f.local_steps)
        return min(steps * f.batch_size, f.local_epochs * n)

    def per_example_flops(self, view: State) -> float:
        """Forward + backward FLOPs of one example on the model ``view`` (cached by its shapes)."""
        key = tuple(sorted((k, tuple(v.shape)) for k, v in view.items()))
        if key not in self._per_example:
            from .client import model_from_state
            from .task import fed_data

            x = fed_data(self.run).x[:1]
            self._per_example[key] = float(count_flops(model_from_state(self.run, view), x, backward=True))
        return self._per_example[key]

    def round(self, sent: dict[int, State], replies: dict[int, State]) -> tuple[float, list[int], list[int], dict]:
        """(simulated round seconds, kept pids, dropped pids, per-pid seconds) for the clients that replied.
        ``sent``/``replies``: pid -> what it downloaded / uploaded."""
        times = {}
        for pid, up in replies.items():
            flops = self.per_example_flops(sent[pid]) * self.examples(pid)
            times[pid] = client_time(self.population[pid], flops, state_bytes(sent[pid]), state_bytes(up))
        secs, kept, dropped = round_clock(times, self.cfg.deadline_s)
        self.elapsed += secs
        return secs, kept, dropped, times
