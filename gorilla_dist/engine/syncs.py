"""Counting the points where the host waits for the device: `with SyncCounter() as syncs: ...`.

On a GPU every `.item()`, `float(t)`, `if t:`, `.tolist()`, `.cpu()` or data-dependent shape
(`nonzero`, a boolean index) inside a training step stalls the host until the device's queue drains,
so the host can no longer run ahead and the device idles between kernels. On a CPU nothing stalls,
but the same calls are there, so they can be counted here and kept out of the step on any device.

Two hooks see them: a TorchDispatchMode sees every aten operation (also those DeepSpeed and torch run
inside C++ composites, e.g. `Tensor.item` -> `aten::_local_scalar_dense`), and a TorchFunctionMode sees
the Python tensor methods that read memory without an aten call on a CPU tensor (`tolist`, `numpy`).
Each sync is recorded with its call site: the innermost frame outside torch and this module.

The dispatch mode also counts every operation (`ops`): the number of launches a step costs.
"""

from __future__ import annotations

import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# aten operations whose result the host must wait for (value or data-dependent shape)
SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",  # .item(), float(t), int(t), bool(t), `if t:`
    _aten.is_nonzero.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.equal.default: "equal",  # torch.equal returns a Python bool
}
# Python tensor methods that read memory without an aten op on a CPU tensor (on a GPU they copy to host)
SYNC_METHODS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy"}

# Reads the counter cannot tell from syncs on a CPU (where every tensor is a host tensor) but that read
# a tensor made on the host on any device, so a GPU never waits: "file function" -> why. Counted apart.
HOST_ONLY = {
    "megatron/core/transformer/attention.py custom_forward":
        "selective recompute passes the mask type through checkpoint() as torch.tensor([value]) (made on the "
        "host, no device) and reads it back with .item()",
}

_TORCH_DIR = str(Path(torch.__file__).parent)
_HERE = str(Path(__file__))


def _call_site() -> tuple[str, str]:
    """('path:line function', 'path function') of the innermost frame that is neither torch nor this module."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_TORCH_DIR) or frame.filename == _HERE:
            continue
        path = _short(frame.filename)
        return f"{path}:{frame.lineno} {frame.name}", f"{path} {frame.name}"
    return "?", "?"


def _short(path: str) -> str:
    """An installed library's path from its package (megatron/core/...), ours from the repository's folder."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path[path.index(marker) + len(marker):]
    for marker in ("gorilla_dist/", "tests/", "benchmarks/"):
        if marker in path:
            return path[path.index(marker):]
    return path


def _to_host(func, args, kwargs) -> bool:
    """A copy from a non-CPU device to the CPU (aten::_to_copy / copy_)."""
    if func is _aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func is _aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _from_host(func, args, kwargs) -> bool:
    """A blocking copy of host data to another device: a CPU tensor copied without non_blocking=True, or with it
    from pageable memory (CUDA stages such a copy and the host waits for it, and the copy for the stream's
    queued work; only a pinned source is asynchronous: data.loader.Batch.to pins), or a tensor made
    from Python numbers on a GPU (torch.tensor(..., device=cuda) reaches aten::lift_fresh already on the
    device). Never seen on a CPU-only run, where there is no other device."""
    if func is _aten.lift_fresh.default:
        return args[0].device.type not in ("cpu", "meta")
    if func is _aten._to_copy.default:
        device = kwargs.get("device")
        return (device is not None and torch.device(device).type != "cpu" and args[0].device.type == "cpu"
                and not (kwargs.get("non_blocking", False) and args[0].is_pinned()))
    return False


def _bool_index(func, args) -> bool:
    return func is _aten.index.Tensor and any(
        i is not None and i.dtype == torch.bool for i in args[1])


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counter.ops += 1
        kind = SYNC_OPS.get(func)
        if kind is None and _to_host(func, args, kwargs):
            kind = "to_host"
        if kind is None and _from_host(func, args, kwargs):
            kind = "to_device"
        if kind is None and _bool_index(func, args):
            kind = "bool_index"
        if kind is not None:
            self.counter.record(kind)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = SYNC_METHODS.get(func)
        if kind is not None:
            self.counter.record(kind)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts host syncs (by call site) and aten operations inside a `with` block.

    `total`: syncs; `sites`: Counter of "kind @ file:line function"; `ops`: aten operations run;
    `host_only`: reads at the HOST_ONLY sites (not syncs on any device). Not thread-safe; one counter at a
    time."""

    def __init__(self):
        self.total, self.ops, self.host_only = 0, 0, 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._modes = (_Function(self), _Dispatch(self))

    def record(self, kind: str) -> None:
        site, where = _call_site()
        if where in HOST_ONLY:
            self.host_only += 1
            return
        self.total += 1
        self.sites[f"{kind} @ {site}"] += 1

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self, steps: int = 1, top: int = 20) -> str:
        """Syncs and operations per step, then the call sites with the most syncs."""
        lines = [f"{self.total / steps:g} host syncs and {self.ops / steps:g} aten operations per step"]
        for site, n in self.sites.most_common(top):
            lines.append(f"  {n / steps:g}  {site}")
        return "\n".join(lines)


class LoopSyncs:
    """logging.count_syncs: the host syncs of the training loop's quiet steps (no log, evaluation or
    checkpoint at their end; after the first `warmup` steps, which measure memory and let ZeRO-3
    record its trace), for summary.json: where a GPU would wait for the host. Off: costs nothing."""

    def __init__(self, enabled: bool, first_step: int, warmup: int = 3):
        self.counter = SyncCounter() if enabled else None
        self.after, self.steps = first_step + warmup, 0

    def counting(self, step: int, quiet: bool):
        """Context for the loop body of step `step` (1-based); counts when enabled and `quiet`."""
        from contextlib import nullcontext

        if self.counter is None or not quiet or step <= self.after:
            return nullcontext()
        self.steps += 1
        return self.counter

    def report(self) -> dict | None:
        if self.counter is None:
            return None
        n = max(self.steps, 1)
        return {"steps_counted": self.steps, "per_step": self.counter.total / n, "ops_per_step": self.counter.ops / n,
                "host_only_reads_per_step": self.counter.host_only / n,
                "sites": {site: count / n for site, count in self.counter.sites.most_common(20)}}


if __name__ == "__main__":  # a quick look: python -m gorilla_dist.engine.syncs
    with SyncCounter() as c:
        torch.ones(3).sum().item()
    print(c.report(), file=sys.stdout)
