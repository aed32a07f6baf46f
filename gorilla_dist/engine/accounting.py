"""This rank's bytes of parameters, gradients and optimizer state, counted from the tensors DeepSpeed's
optimizers hold (see gorilla_dist/memory.py for what each kind means). Written against DeepSpeed 0.19.8:
it reads the optimizers' flat partitions and buffers by their field names."""

from __future__ import annotations

import torch

from gorilla_dist.memory import KINDS


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
