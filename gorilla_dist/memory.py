"""Memory accounting per rank: what the training state holds, and what a step's activations take.

State bytes (`state_bytes`) are counted from the tensors themselves, each storage once, wherever the
engine keeps it:
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


def _tensors(obj, depth: int = 3):
    """Tensors in obj: a tensor, or lists/tuples/dicts of them, nested up to `depth`."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth - 1)


def _grad_buffers(optimizer):
    """DeepSpeed optimizers' gradient storage, found by attribute name: flat gradient partitions
    (`averaged_gradients`, `grads_in_partition`, `fp32_groups_gradients_flat`,
    `grad_partitions_flat_buffer`, ...) and reduction buckets (`ipg_*`)."""
    for name, value in vars(optimizer).items():
        lowered = name.lower()
        if "grad" in lowered or "ipg" in lowered:
            yield from _tensors(value)


def state_bytes(engine) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (see the module docstring)."""
    seen: set[int] = set()
    totals = dict.fromkeys(KINDS, 0)

    def add(kind: str, tensors) -> None:
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            totals[kind] += storage.nbytes()

    params = list(engine.module.parameters())
    add("params", (getattr(p, "ds_tensor", None) for p in params))  # ZeRO-3: this rank's partition
    add("params", params)  # the weights themselves (empty under ZeRO-3 except the persistent ones)
    opt = engine.optimizer
    basic = getattr(opt, "optimizer", opt)
    masters = list(_tensors(getattr(opt, "fp32_partitioned_groups_flat", None)))  # ZeRO-3
    masters += [p for group in basic.param_groups for p in group["params"]]
    masters += list(_tensors(getattr(opt, "fp32_groups", None)))  # FP16_UnfusedOptimizer (bf16/fp16 ZeRO-0)
    add("grads", (p.grad for p in params))
    add("grads", (m.grad for m in masters))
    if opt is not basic:
        add("grads", _grad_buffers(opt))
    add("optimizer", masters)  # a master that is the weight itself was counted as params already
    add("optimizer", (t for state in basic.state.values() for t in _tensors(state)))
    return totals


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
        self._take(state_bytes(self.engine))

    def after_update(self) -> None:
        self._take(state_bytes(self.engine))

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
