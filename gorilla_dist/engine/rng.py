"""Random-number state: megatron-core's model-parallel RNG tracker seeded and, without CUDA, run on
CPU generators; every generator a rank uses captured into tensors and restored (checkpoints).

Written against megatron-core 0.16.1 (see versions.py): `seed_rng_tracker` replaces the tracker's
`fork` and `tensor_parallel.random._get_all_rng_states` / `_set_all_rng_states` on CPU.
"""

from __future__ import annotations

import contextlib
import types

import torch


def seed_rng_tracker(seed: int, device: torch.device) -> None:
    """megatron-core's model-parallel RNG stream (dropout inside sequence-parallel regions runs under
    `get_cuda_rng_tracker().fork()`), seeded as Megatron's initialisation does: seed + 2718 + TP rank.
    On CUDA this is megatron's own `model_parallel_cuda_manual_seed`. Without CUDA the tracker keeps
    CPU generator states and forks the CPU generator, and activation recompute saves and restores the
    CPU generator and the tracker (what `CheckpointFunction` does with the CUDA ones)."""
    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core import parallel_state as ps

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    if device.type == "cuda":
        undo_cpu_patches()  # (a CPU model built earlier in this process, e.g. by a test)
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    _MEGATRON.setdefault("states", (mrandom._get_all_rng_states, mrandom._set_all_rng_states))
    stream = torch.Generator().manual_seed(seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.states_[mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME] = stream.get_state()
    tracker.fork = types.MethodType(_fork_cpu, tracker)
    mrandom._get_all_rng_states = lambda: (torch.get_rng_state(), None, tracker.get_states())

    def set_all(cpu_state, _cuda_state, tracker_states):
        torch.set_rng_state(cpu_state)
        tracker.set_states(tracker_states)

    mrandom._set_all_rng_states = set_all


_MEGATRON: dict = {}
"""megatron's own _get_all_rng_states / _set_all_rng_states, kept while the CPU versions stand in."""


def undo_cpu_patches() -> None:
    """Put back what seed_rng_tracker replaced for a CPU process: the CPU patches live only while CPU models
    are built in this process."""
    import megatron.core.tensor_parallel.random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.__dict__.pop("fork", None)  # the instance's CPU fork; the class's CUDA one again
    if "states" in _MEGATRON:
        mrandom._get_all_rng_states, mrandom._set_all_rng_states = _MEGATRON.pop("states")


@contextlib.contextmanager
def _fork_cpu(tracker, name: str = "model-parallel-rng"):
    if name not in tracker.states_:
        raise RuntimeError(f"RNG stream {name} was not seeded")
    outside = torch.get_rng_state()
    torch.set_rng_state(tracker.states_[name])
    try:
        yield
    finally:
        tracker.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outside)


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's generators: torch's, CUDA's, and megatron's model-parallel tracker streams."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, value in get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = value.cpu()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
