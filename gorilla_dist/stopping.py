"""Stop cleanly on a signal: preemption warnings (Slurm's --signal=USR1@<s>), `scancel`, time limits.

On SIGUSR1 or SIGTERM a rank only records the signal. Every `train.log_interval` steps (where the
loop reads its losses anyway) every rank joins one tiny all-reduce (MAX), so all ranks agree to stop
after the same step even when the signal reached only some of them; the trainer then saves a
checkpoint and the worker exits with EXIT_PREEMPTED, which tells the Slurm script to requeue the job.
A single process needs nobody's agreement and stops after the step it is in. A second SIGTERM ends the
process at once.

Agreeing every step would read the device every step (the flag's value decides the loop); a stop then
comes up to log_interval - 1 steps later, well inside any preemption grace period worth the name.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    def __init__(self, layout, every: int = 1):
        self.layout, self.every = layout, max(1, every)
        self.received: str | None = None
        self._stopped = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, _frame) -> None:
        if self.received is not None and signum == signal.SIGTERM:  # asked twice: go now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.received = signal.Signals(signum).name
        print(f"[rank {self.layout.rank}] {self.received}: saving a checkpoint at the next step boundary, "
              "then exiting", file=sys.stderr, flush=True)

    def agreed(self, step: int, last: bool = False) -> bool:
        """Collective (every rank calls it after each step, `step` counted from 1): did any rank get a
        stop signal? Asked of the others every `every` steps and at the last."""
        if self.layout.world == 1:  # nobody to agree with: no tensor, no device sync
            return self.received is not None
        if step % self.every and not last:
            return False
        flag = torch.full((1,), 0.0 if self.received is None else 1.0, device=self.layout.device)  # (no host copy)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def saved(self) -> None:
        """The stop checkpoint is written: ignore further stop signals while this rank reports and exits.
        (The deepspeed launcher sends SIGTERM to the remaining ranks as soon as one of them has exited; as a
        second signal it would end this rank before it said where it stopped. And a rank that stopped on its
        peers' agreement may receive its own copy of the signal only now: Slurm delivers `scancel --signal` to
        each node's tasks separately, and under load node 2's came after the stop; with the default action
        restored it ended the rank with status 138 instead of 75, so the job was not requeued.)"""
        self._stopped = True
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def close(self) -> None:
        """The handlers from before, unless this rank stopped on a signal (saved): then the stop signals stay
        ignored until the process exits."""
        if self._stopped:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
