"""The adaptations megatron-core needs (written against 0.16.1, see versions.py), each replacing one
named library call. Applied by `adapt_model` to every model build_model returns.

0. RowParallelLinear.forward passes `tp_group=None` to
   `linear_with_grad_accumulation_and_async_allreduce`, which then looks the group up and emits a
   DeprecationWarning on every call — and a warning inside forward splits torch.compile's graph at
   every layer. `quiet_tp_group_lookup` gives tensor_parallel/layers.py the same lookup without the
   warning (the group it returns is identical).

megatron-core also assumes CUDA in a few places that the local (no Transformer Engine) spec reaches
(no-ops on GPU):
  1. RotaryEmbedding.get_emb moves `inv_freq` to `torch.cuda.current_device()` on the first forward
     (models/common/embeddings/rotary_pos_embedding.py). `adapt_model` swaps in a subclass
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
  4a. Generation with a KV cache (megatron's static inference context) allocates each layer's key and value
     memory with `device=torch.cuda.current_device()` (transformer/attention.py `_allocate_memory`): that
     module gets the same `torch` as 4.
  4b. Dropout under sequence parallelism forks the CUDA RNG tracker, and activation recompute
     (tensor_parallel.random.CheckpointFunction) saves and restores the CUDA RNG state around the
     recomputed forward. `rng.seed_rng_tracker` seeds the tracker (on CUDA with megatron's own call) and,
     without CUDA, makes both use the CPU generator.

Mixture of experts (transformer/moe/), applied by `cpu_moe` before an MoE model is built:
  6. `moe_utils` names Transformer Engine's `te_general_gemm` and `fused_*` helpers in its functions but
     binds them only when TE imports, so the router's gating linear raises NameError without TE (GPU
     too). They are bound to None, which each call site already treats as "not available".
  7. The router moves its weight to `torch.cuda.current_device()` in every forward (router.py) and
     allocates its expert-bias buffers there: given the `torch` of 4.
  8. The alltoall token dispatcher creates a `torch.cuda.Stream` when built and copies its split sizes to
     the host on it (`_maybe_dtoh_and_synchronize`). On CPU there is no stream and the sizes are already
     host tensors (numpy arrays, as the CUDA path makes them, are what the all-to-alls take):
     `_cpu_dtoh_and_synchronize` replaces that method without CUDA.

  9. With tensor-parallel experts, the alltoall dispatcher gathers and reduce-scatters a different number
     of tokens per TP rank (tensor_parallel/mappings.py `_gather_along_first_dim` /
     `_reduce_scatter_along_first_dim` with split sizes, as lists of unequal tensors). NCCL takes those;
     gloo refuses unequal sizes. On gloo, `uneven_tp_collectives` pads every rank's part to the largest,
     runs the equal-size collective and cuts the padding off (the same result).

  10. Pipeline stages with tied embeddings: the first stage's word embeddings and the last stage's output
     weight are one parameter in two places. megatron's `LanguageModule.setup_embeddings_and_output_layer`
     zeroes the last stage's copy and all-reduces both over the embedding group so they start equal, after
     `weight.data = weight.data.cuda()`. `tie_stage_embeddings` does the same without the move (model/spec.py's
     GPT calls it). Their gradients are summed over that group once per step (engine/pipeline.py), and the last
     stage's copy is marked `ds_pipe_replicated`, so it is counted once in the gradient norm (DeepSpeed's
     norms skip it, as on_device.global_grad_norm does).

One thing megatron-core leaves to its own DDP wrapper, which we do not use (DeepSpeed owns gradients):
  5. Sequence parallelism: each TP rank normalises only its slice of the sequence, so a norm's weight
     gradient is a partial sum that megatron's `finalize_model_grads` all-reduces over the TP group.
     `sum_sequence_parallel_grads` does that with a gradient hook on every parameter megatron marks
     `sequence_parallel` (before DeepSpeed accumulates or partitions the gradient).
     (Its norm wrapper refuses sequence parallelism, so model/spec.py's TorchNorm marks the parameters.)
"""

from __future__ import annotations

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


def adapt_model(model: torch.nn.Module, device: torch.device, *, sequence_parallel: bool) -> None:
    """Applied to every model build_model returns (1, 4, 4a and 5 above; 0, 4 and 4a are process-wide)."""
    quiet_tp_group_lookup()
    cpu_buffers()
    if sequence_parallel:
        sum_sequence_parallel_grads(model)
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
    """4 and 4a above."""
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.transformer.attention as attention
    import megatron.core.utils as mutils

    if torch.cuda.is_available():
        return
    for module in (layers, mappings, mutils, attention):
        if not isinstance(module.torch, _TorchOnCPU):
            module.torch = _TorchOnCPU()


def cpu_moe() -> None:
    """6 to 9 above (process-wide; 7 to 9 only without CUDA)."""
    import megatron.core.transformer.moe.experts as experts
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.router as router
    import megatron.core.transformer.moe.token_dispatcher as dispatcher

    for name in ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute"):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
    if torch.cuda.is_available():
        return
    for module in (router, experts, dispatcher):
        if not isinstance(module.torch, _TorchOnCPU):
            module.torch = _TorchOnCPU()
    uneven_tp_collectives()
    a2a = dispatcher.MoEAlltoAllTokenDispatcher
    if a2a.cuda_dtoh_stream is None:
        a2a.cuda_dtoh_stream = "no stream on CPU"  # the constructor creates one only when this is None
    a2a._maybe_dtoh_and_synchronize = _cpu_dtoh_and_synchronize


def uneven_tp_collectives() -> None:
    """9 above (without CUDA, where the collectives run on gloo)."""
    import megatron.core.tensor_parallel.mappings as mappings

    if getattr(mappings, "_gorilla_uneven", False):
        return
    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_padded(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)])

    def reduce_scatter_padded(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((len(sizes) * longest, *input_.shape[1:]))
        for i, part in enumerate(torch.split(input_, sizes)):
            padded[i * longest: i * longest + sizes[i]] = part
        out = input_.new_empty((longest, *input_.shape[1:]))
        torch.distributed.reduce_scatter_tensor(out, padded, group=group)
        return out[: sizes[group.rank()]]

    mappings._gather_along_first_dim = gather_padded
    mappings._reduce_scatter_along_first_dim = reduce_scatter_padded
    mappings._gorilla_uneven = True


def _cpu_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize on CPU: the values it copies to the host are
    there already; the split sizes become numpy arrays, as the CUDA path makes them (the all-to-all
    needs host sizes)."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def tie_stage_embeddings(model) -> None:
    """10 above: LanguageModule.setup_embeddings_and_output_layer for a model split over pipeline stages."""
    import torch.distributed as dist

    if model.pre_process:
        model.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
    if model.post_process and model.output_layer.weight is not None:
        model.output_layer.weight.is_embedding_or_output_parameter = True
    weight = model.shared_embedding_or_output_weight()
    weight.shared_embedding = True
    if model.post_process and not model.pre_process:
        weight.data.fill_(0)  # the first stage's values arrive with the all-reduce
        weight.shared = True
        weight.ds_pipe_replicated = True  # counted once in the gradient norm: on the first stage
    if dist.is_initialized() and model._is_in_embd_group():
        dist.all_reduce(weight.data, group=model.embd_group)


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
