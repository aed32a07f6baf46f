"""The one place that turns a ModelConfig into megatron-core objects.

Layers come from megatron-core's local spec (no Transformer Engine or Apex needed); the
`core_attention` slot is filled from gorilla_dist.kernels by `model.attention`. Tensor parallelism is
the megatron-core column/row-parallel linears the spec already uses; the TP size comes from
parallel_state, initialised by gorilla_dist.parallel before this runs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from gorilla_dist.kernels import core_attention_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from gorilla_dist.model.compat import TorchNorm, adapt_for_device, seed_rng_tracker, sum_sequence_parallel_grads

VOCAB_MULTIPLE = 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int) -> int:
    """Embedding rows: the vocabulary padded up to a multiple of 128 — fast matmuls, and the same
    shape (hence the same init) for every tensor-parallel size up to 128."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def unpadded_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return logits[..., :vocab_size]


RECOMPUTE = {"none": {},
             # megatron-core's selective recompute: the core attention (scores, softmax) of every layer
             "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
             # every layer: only its input is kept; the layer runs again in the backward
             "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}


def transformer_config(m, *, tp: int, dtype: str, sequence_parallel: bool = False,
                       activation_checkpointing: str = "none") -> TransformerConfig:
    swiglu = m.activation == "swiglu"
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        add_bias_linear=m.bias,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        normalization=m.normalization,
        layernorm_epsilon=1e-5,
        init_method_std=m.init_std,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        **RECOMPUTE[activation_checkpointing],
        # Draw each full weight on the host from one seeded generator, then split: the same initial
        # model for every TP size (and no CUDA RNG tracker needed; see compat.py).
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        # The fused CUDA kernels are optional speed-ups; the unfused paths run on every device.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def block_spec(m) -> TransformerBlockSubmodules:
    """megatron-core's local layer spec (one per layer) with our core attention and our norm."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=m.normalization))
    module, params = core_attention_spec(m)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=module, params=params)
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * m.num_layers, layer_norm=TorchNorm)


def build_model(m, *, dtype: str, device: torch.device, seed: int, parallel=None) -> GPTModel:
    """A GPTModel on `device`. `m.vocab_size` must be set (from the tokenizer). The initial weights
    depend only on (m, seed), never on the tensor-parallel layout. `parallel` (a ParallelConfig):
    sequence parallelism and activation checkpointing; None: neither."""
    from megatron.core import parallel_state as ps

    from megatron.core.process_groups_config import ProcessGroupCollection

    sp = bool(parallel is not None and parallel.sequence_parallel)
    recompute = parallel.activation_checkpointing if parallel is not None else "none"
    torch.manual_seed(seed)
    seed_rng_tracker(seed, device)
    model = GPTModel(
        # Explicit process groups, as megatron-core asks (it deprecates looking them up implicitly).
        # RowParallelLinear still passes tp_group=None internally; compat.quiet_tp_group_lookup covers that.
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        config=transformer_config(m, tp=ps.get_tensor_model_parallel_world_size(), dtype=dtype,
                                  sequence_parallel=sp, activation_checkpointing=recompute),
        transformer_layer_spec=block_spec(m),
        vocab_size=padded_vocab_size(m.vocab_size),
        max_sequence_length=m.seq_length,
        share_embeddings_and_output_weights=m.tie_embeddings,
        # ALiBi lives in core_attention (kernels/alibi.py): megatron adds no position embedding then.
        position_embedding_type="none" if m.position_embedding == "alibi" else m.position_embedding,
        rotary_base=m.rotary_base,
        parallel_output=True,
    )
    adapt_for_device(model, device)
    if sp:
        sum_sequence_parallel_grads(model)
    return model.to(device)


def flops_per_token(m) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM/Megatron MFU
    convention: 6 * matmul parameters + 12 * layers * width * sequence for attention scores."""
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    kv = (m.num_query_groups or m.num_heads) * (h // m.num_heads)
    ffn = m.ffn_hidden_size or 4 * h
    per_layer = h * (h + 2 * kv) + h * h + (3 if m.activation == "swiglu" else 2) * h * ffn
    matmul_params = L * per_layer + h * padded_vocab_size(m.vocab_size)
    return 6.0 * matmul_params + 12.0 * L * h * s
