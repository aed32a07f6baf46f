"""Memory accounting per rank: what the training state holds, and what a step's activations take.

State bytes (`TrainEngine.state_bytes`, gorilla_dist/engine/accounting.py) are counted from the
tensors themselves, each storage once, wherever the engine keeps it:
    params     the model's weights as this rank holds them (a ZeRO-3 rank: its partition, plus the
               small parameters DeepSpeed keeps whole)
    grads      gradient buffers: `.grad` of the weights and of the fp32 masters, and DeepSpeed's
               flat gradient partitions and reduction buckets
    optimizer  AdamW's moments and step, and the fp32 master weights when they are a separate copy
               (bf16/fp16 training, or any ZeRO stage; fp32 ZeRO-0 updates the weights themselves)

Peak activation memory (`ActivationPeak`) is measured, not estimated: the peak of bytes allocated
during one micro-batch's forward and backward, minus what is still allocated when the backward ends
(the gradients and buffers it created), so it is the activations and temporaries. On CUDA it comes
from torch.cuda's allocator statistics (max_memory_allocated). On the CPU, which keeps no allocator
statistics, a TorchDispatchMode sees every tensor an operation returns, counts the storages that did
not exist among its inputs (fresh allocations, not views or in-place results) and uncounts each when
it is freed (a weakref finalizer on the storage).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

KINDS = ("params", "grads", "optimizer")


class _Allocations(TorchDispatchMode):
    """CPU allocation tracking (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage(), inputs)
        return out

    def _track(self, storage, inputs: set[int]) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in inputs or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


class ActivationPeak:
    """`with peak.measure(): forward + backward` any number of times; `peak.bytes` is the largest
    (allocation peak - what is still allocated at the end) seen."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            peak, end = torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
        else:
            with _Allocations() as counter:
                yield
            peak, end = counter.peak, counter.live
        self.bytes = max(self.bytes, peak - end)


class FirstStepProbe:
    """What train_step needs to measure the first step: activation peaks per micro-batch, and the
    state before the optimizer update (gradients complete) and after it (optimizer state created)."""

    def __init__(self, engine, device: torch.device):
        self.engine, self.activations = engine, ActivationPeak(device)
        self.state = dict.fromkeys(KINDS, 0)

    def micro_batch(self):
        return self.activations.measure()

    def before_update(self) -> None:
        self._take(self.engine.state_bytes())

    def after_update(self) -> None:
        self._take(self.engine.state_bytes())

    def _take(self, now: dict[str, int]) -> None:
        self.state = {k: max(self.state[k], now[k]) for k in KINDS}

    def result(self) -> dict[str, int]:
        return {**self.state, "activations_peak": self.activations.bytes}


def gather_ranks(numbers: dict[str, int], layout) -> list[dict[str, int]]:
    """Every rank's numbers, in rank order (one all_gather_object; every rank calls it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or layout.world == 1:
        return [numbers]
    out = [None] * layout.world
    dist.all_gather_object(out, numbers)
    return out


def describe(per_rank: list[dict[str, int]]) -> str:
    """One line per rank, in MiB."""
    lines = []
    for rank, numbers in enumerate(per_rank):
        parts = [f"{k} {v / 2**20:,.1f}" for k, v in numbers.items()]
        total = sum(numbers[k] for k in KINDS)
        lines.append(f"  rank {rank}: " + ", ".join(parts) + f" (state {total / 2**20:,.1f}) MiB")
    return "\n".join(lines)
