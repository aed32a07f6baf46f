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
"""

from __future__ import annotations

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
    rope = getattr(model, "rotary_pos_emb", None)
    if device.type != "cuda" and type(rope) is RotaryEmbedding:
        rope.__class__ = _DeviceRotaryEmbedding
        rope.inv_freq = rope.inv_freq.to(device)
