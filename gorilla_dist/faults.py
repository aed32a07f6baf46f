"""Fault injection for the fault-tolerance tests: a crash, a hang or a NaN at a named point.

Off unless the environment sets GORILLA_FAULT="<action>:<point>[@<step>][/<rank>]" (several separated
by ';'). Actions:
    kill   SIGKILL this process on the spot (a worker or node dying, `kill -9`)
    hang   stop making progress (a stuck rank); SIGTERM/SIGKILL still end it
    nan    poison this rank's loss with NaN (point `loss`)
Points: `loss` (each micro-batch), `step` (after the optimizer step), and the stages of a checkpoint
save: `checkpoint.begin`, `checkpoint.engine_saved`, `checkpoint.weights_saved`,
`checkpoint.manifest_written`, `checkpoint.renamed`.
"""

from __future__ import annotations

import os
import signal
import time
from functools import lru_cache

ENV = "GORILLA_FAULT"
ACTIONS = ("kill", "hang", "nan")


@lru_cache(maxsize=4)
def _parse(spec: str) -> tuple[tuple[str, str, int | None, int | None], ...]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        action, _, rest = item.partition(":")
        rest, _, rank = rest.partition("/")
        point, _, step = rest.partition("@")
        if action not in ACTIONS or not point:
            raise ValueError(f"{ENV}={spec!r}: expected <{'|'.join(ACTIONS)}>:<point>[@<step>][/<rank>]")
        faults.append((action, point, int(step) if step else None, int(rank) if rank else None))
    return tuple(faults)


def hit(point: str, *, step: int, rank: int) -> bool:
    """Run the fault configured for this point (kill and hang do not return); True for `nan`."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for action, where, at_step, at_rank in _parse(spec):
        if where != point or at_step not in (None, step) or at_rank not in (None, rank):
            continue
        print(f"[fault] rank {rank}: {action} at {point}, step {step}", flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stuck, but a launcher can still end it
            while True:
                time.sleep(3600)
        return True
    return False
