"""The narrow adaptations megatron-core 0.16 needs to run on CPU. Everything here is a no-op on GPU.

megatron-core assumes CUDA in a few places that the local (no Transformer Engine) spec still reaches:
  1. RotaryEmbedding.get_emb moves `inv_freq` to `torch.cuda.current_device()` on the first forward
     (models/common/embeddings/rotary_pos_embedding.py). `cpu_rotary_embedding` swaps in a subclass
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


class _DeviceRotaryEmbedding(RotaryEmbedding):
    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]


def adapt_for_device(model: torch.nn.Module, device: torch.device) -> None:
    rope = getattr(model, "rotary_pos_emb", None)
    if device.type != "cuda" and type(rope) is RotaryEmbedding:
        rope.__class__ = _DeviceRotaryEmbedding
        rope.inv_freq = rope.inv_freq.to(device)
