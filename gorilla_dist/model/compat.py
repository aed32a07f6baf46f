"""The narrow adaptations megatron-core 0.16 needs, each replacing one named library call.

0. RowParallelLinear.forward passes `tp_group=None` to
   `linear_with_grad_accumulation_and_async_allreduce`, which then looks the group up and emits a
   DeprecationWarning on every call — and a warning inside forward splits torch.compile's graph at
   every layer. `quiet_tp_group_lookup` gives tensor_parallel/layers.py the same lookup without the
   warning (the group it returns is identical).

megatron-core also assumes CUDA in a few places that the local (no Transformer Engine) spec reaches
(no-ops on GPU):
  1. RotaryEmbedding.get_emb moves `inv_freq` to `torch.cuda.current_device()` on the first forward
     (models/common/embeddings/rotary_pos_embedding.py). `adapt_for_device` swaps in a subclass
     whose get_emb is identical except that it leaves `inv_freq` where the model lives.
  2. DotProductAttention allocates a buffer on CUDA and forks the CUDA RNG tracker for dropout; we do
     not use it: our own core_attention (gorilla_dist.kernels) runs on any device.
  3. Weight init through the CUDA RNG tracker: avoided with `use_cpu_initialization=True`, which also
     makes the initial weights identical for every tensor-parallel size (the full matrix is drawn
     from one seeded generator, then split).
  4. Sequence parallelism allocates its gather / reduce-scatter buffers with
     `device=torch.cuda.current_device()` (tensor_parallel/mappings.py, tensor_parallel/layers.py, and
     the GlobalMemoryBuffer in utils.py). Without CUDA, `cpu_buffers` gives those three modules a
     `torch` that is the real one except that `torch.cuda.current_device()` names the CPU.
  4b. Dropout under sequence parallelism forks the CUDA RNG tracker, and activation recompute
     (tensor_parallel.random.CheckpointFunction) saves and restores the CUDA RNG state around the
     recomputed forward. `seed_rng_tracker` seeds the tracker (on CUDA with megatron's own call) and,
     without CUDA, makes both use the CPU generator.

Two things megatron-core leaves to its own DDP wrapper, which we do not use (DeepSpeed owns gradients):
  5. Sequence parallelism: each TP rank normalises only its slice of the sequence, so a norm's weight
     gradient is a partial sum that megatron's `finalize_model_grads` all-reduces over the TP group.
     `sum_sequence_parallel_grads` does that with a gradient hook on every parameter megatron marks
     `sequence_parallel` (before DeepSpeed accumulates or partitions the gradient).
  6. megatron's torch-norm wrapper (WrappedTorchNorm, used when Apex is absent) refuses sequence
     parallelism only because it does not mark its parameters; `TorchNorm` is the same torch
     LayerNorm/RMSNorm with the parameters marked, as megatron's fused norms mark theirs.
"""

from __future__ import annotations

import contextlib
import types

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


def quiet_tp_group_lookup() -> None:
    import megatron.core.tensor_parallel.layers as layers
    from megatron.core import parallel_state

    if getattr(layers, "_gorilla_quiet", False):
        return

    def tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
        if tp_group is not None or not torch.distributed.is_initialized() or not parallel_state.is_initialized():
            return tp_group
        if is_expert:
            return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
        return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)

    layers.get_tensor_model_parallel_group_if_none = tp_group_if_none
    layers._gorilla_quiet = True


class _DeviceRotaryEmbedding(RotaryEmbedding):
    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]


def adapt_for_device(model: torch.nn.Module, device: torch.device) -> None:
    """Applied to every model build_model returns."""
    quiet_tp_group_lookup()
    cpu_buffers()
    rope = getattr(model, "rotary_pos_emb", None)
    if device.type != "cuda" and type(rope) is RotaryEmbedding:
        rope.__class__ = _DeviceRotaryEmbedding
        rope.inv_freq = rope.inv_freq.to(device)


class _CudaOnCPU(types.ModuleType):
    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")


class _TorchOnCPU(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCPU("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch, name)


def cpu_buffers() -> None:
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.utils as mutils

    if torch.cuda.is_available():
        return
    for module in (layers, mappings, mutils):
        if not isinstance(module.torch, _TorchOnCPU):
            module.torch = _TorchOnCPU()


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
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    stream = torch.Generator().manual_seed(seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.states_[mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME] = stream.get_state()
    tracker.fork = types.MethodType(_fork_cpu, tracker)
    mrandom._get_all_rng_states = lambda: (torch.get_rng_state(), None, tracker.get_states())

    def set_all(cpu_state, _cuda_state, tracker_states):
        torch.set_rng_state(cpu_state)
        tracker.set_states(tracker_states)

    mrandom._set_all_rng_states = set_all


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


class TorchNorm:
    """torch LayerNorm / RMSNorm for megatron-core's norm slots (see 6 above)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def sum_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Gradients of parameters marked `sequence_parallel` are summed over the TP group (see 5 above)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()

    def tp_sum(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            p.register_hook(tp_sum)
