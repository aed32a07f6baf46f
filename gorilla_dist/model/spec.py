"""The one place that turns a ModelConfig into megatron-core objects.

Layers come from megatron-core's local spec (no Transformer Engine or Apex needed); the
`core_attention` slot is filled from gorilla_dist.kernels by `model.attention`. Tensor parallelism is
the megatron-core column/row-parallel linears the spec already uses; the TP size comes from
parallel_state, initialised by gorilla_dist.parallel before this runs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import init_method_normal

from gorilla_dist.config import RECOMPUTE, FinetuneConfig, ModelConfig, ParallelConfig, layer_weight_sets, moe_layers
from gorilla_dist.dtypes import TORCH_DTYPES
from gorilla_dist.config.parallel import stage_chunks
from gorilla_dist.engine.megatron_cpu import adapt_model, cpu_moe, tie_stage_embeddings
from gorilla_dist.engine.chunks import chunk_view
from gorilla_dist.engine.moe import reset_aux_loss_tracker
from gorilla_dist.engine.rng import seed_rng_tracker
from gorilla_dist.errors import ConfigError
from gorilla_dist.kernels import core_attention_spec
from gorilla_dist.model.deltas import LINEARS, add_deltas, attach_low_rank
from gorilla_dist.model.head import attach_classifier, attach_objective_heads
from gorilla_dist.model.prefix import attach_prefix
from gorilla_dist.model.prompts import attach_soft_prompt
from gorilla_dist.kernels.limits import UnsupportedAttention
from gorilla_dist.kernels.registry import attention_kernel

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
    """Embedding rows: the vocabulary padded up to a multiple of 128 — fast matmuls, and the same
    shape (hence the same init) for every tensor-parallel size up to 128."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def unpadded_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return logits[..., :vocab_size]


def mask_vocab_padding(model: GPTModel, vocab_size: int, *, tp_rank: int, tp_size: int) -> None:
    """The output layer's padding rows (ids >= vocab_size, which no tokenizer produces) get logit -inf,
    so the softmax — training's loss, TP's vocab-parallel loss, evaluation — covers the real vocabulary
    only, exactly as the exported transformers model (which has no padding rows) computes it. Each
    tensor-parallel rank masks the ids of its own vocabulary slice."""
    padded = padded_vocab_size(vocab_size)
    if padded == vocab_size or not model.post_process:  # (a pipeline stage without the output layer)
        return
    local = padded // tp_size
    ids = torch.arange(tp_rank * local, (tp_rank + 1) * local)
    model.output_layer.register_buffer("vocab_padding", ids >= vocab_size, persistent=False)  # (local,)

    def mask(layer, _args, output):
        logits, bias = output  # logits (s, b, local), or (s, b, padded) when gathered over TP (generation)
        pad = layer.vocab_padding
        if logits.shape[-1] != pad.shape[0]:
            pad = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
        return logits.masked_fill(pad, float("-inf")), bias

    model.output_layer.register_forward_hook(mask)


class TorchNorm:
    """torch LayerNorm / RMSNorm for megatron-core's norm slots. megatron's own torch-norm wrapper
    (WrappedTorchNorm, used when Apex is absent) refuses sequence parallelism only because it does not
    mark its parameters; here they are marked `sequence_parallel`, as megatron's fused norms mark theirs
    (their gradients are then summed over the TP group: engine/megatron_cpu.py)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def moe_fields(m, *, ep: int) -> dict:
    """megatron-core's TransformerConfig fields for model.moe (empty for a dense model)."""
    e = m.moe
    if not e.num_experts:
        return {}
    return dict(
        num_moe_experts=e.num_experts,
        expert_model_parallel_size=ep,
        moe_router_topk=e.topk,
        moe_ffn_hidden_size=e.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
        moe_shared_expert_intermediate_size=e.shared_expert_size or None,
        moe_shared_expert_gate=e.shared_expert_gate,
        moe_router_score_function=e.router,
        # top-1 softmax after the choice would be the constant 1 (no router gradient): Switch's softmax first
        moe_router_pre_softmax=e.router == "softmax" and e.topk == 1,
        moe_router_load_balancing_type="aux_loss" if e.aux_loss_coeff else "none",
        moe_aux_loss_coeff=e.aux_loss_coeff,
        moe_z_loss_coeff=e.z_loss_coeff or None,
        moe_router_enable_expert_bias=e.expert_bias,
        moe_router_bias_update_rate=e.bias_update_rate,
        moe_expert_capacity_factor=e.capacity_factor,
        moe_token_drop_policy="probs",
        moe_token_dispatcher_type=e.dispatcher,
        moe_router_dtype="fp32",  # routing in fp32 under bf16 too (megatron's advice for stability)
        moe_grouped_gemm=False,  # SequentialMLP: grouped GEMM needs TE / the grouped_gemm CUDA package
        moe_permute_fusion=False,
    )


def transformer_config(m, *, tp: int, dtype: str, seed: int, sequence_parallel: bool = False,
                       activation_checkpointing: str = "none", ep: int = 1,
                       stages: list[int] | None = None) -> TransformerConfig:
    """`stages`: the decoder layers of each pipeline stage (config.parallel.pipeline_split), None for one."""
    swiglu = m.activation == "swiglu"
    init = init_method_normal(m.init_std)
    pipeline = {} if stages is None or len(stages) == 1 else dict(
        pipeline_model_parallel_size=len(stages), pipeline_dtype=TORCH_DTYPES[dtype],
        pipeline_model_parallel_layout="E" + "|".join("t" * n for n in stages) + "L")
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
        layernorm_epsilon=m.norm_eps,
        init_method_std=m.init_std,
        init_method=init,
        # the embeddings drawn from their own generator, as each layer is (SeededLayer): the same on every stage
        embedding_init_method=keyed_init(init, seed, "embedding"),
        tensor_model_parallel_size=tp,
        **pipeline,
        sequence_parallel=sequence_parallel,
        **RECOMPUTE[activation_checkpointing],
        # Draw each full weight on the host from one seeded generator, then split: the same initial
        # model for every TP size (and no CUDA RNG tracker needed; see engine/megatron_cpu.py).
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=TORCH_DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        # The fused CUDA kernels are optional speed-ups; the unfused paths run on every device.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe_fields(m, ep=ep),
    )


class SequentialExperts(SequentialMLP):
    """megatron-core's SequentialMLP (one MLP per local expert, run one after the other), built without
    drawing from the global generator: otherwise the weights of everything built after it would depend
    on how many experts this rank holds (num_experts / ep). `seed_experts` draws each expert instead."""

    def __init__(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            super().__init__(*args, **kwargs)


def draw_seed(seed: int, what: str) -> int:
    """The seed of one part of the initial model (`what`: 'layer 3', 'embedding'), from the run's seed: each
    part is drawn from its own generator, so a part's initial weights do not depend on which other parts a
    rank builds (pipeline stages), nor on the order they are built in."""
    digest = hashlib.sha256(f"{seed}/{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededLayer(TransformerLayer):
    """megatron-core's TransformerLayer, its weights drawn from a generator keyed by the layer's global index
    (draw_seed): layer i starts the same whichever pipeline stage builds it, and the generator the rest of
    the model draws from is left as it was (the output layer's weights do not depend on how many layers a
    stage holds)."""

    def __init__(self, *args, seed: int, index: int, **kwargs):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        # megatron numbers a layer from the offset of its stage; the interleaved schedule's chunks of one rank are
        # not adjacent, so the layer_number handed over is chosen for the sum to be the global one
        offset = get_transformer_layer_offset(kwargs["config"], kwargs.get("vp_stage"),
                                              ps.get_pipeline_model_parallel_rank())
        kwargs["layer_number"] = index + 1 - offset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(seed, f"layer {index}"))
            super().__init__(*args, **kwargs)


def keyed_init(init, seed: int, what: str):
    """`init` (a megatron init method, called on each full tensor) drawing from its own generator: the n-th
    tensor it initialises from draw_seed(seed, f'{what} n'). Leaves the global generator as it was."""
    calls = itertools.count()

    def draw(tensor):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(seed, f"{what} {next(calls)}"))
            return init(tensor)

    return draw


def layer_spec(m, *, num_experts: int | None = None) -> ModuleSpec:
    """megatron-core's local layer spec with our core attention and our norm; with num_experts, its MoE
    MLP (router, token dispatcher, SequentialExperts, optional shared expert)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                  normalization=m.normalization))
    module, params = core_attention_spec(m)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=module, params=params)
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    if num_experts:
        spec.submodules.mlp.submodules.experts.module = SequentialExperts
    return spec


def block_spec(m, *, seed: int, layers: list[int] | range | None = None) -> TransformerBlockSubmodules:
    """One layer spec per layer of `layers` (global indices; None: all): dense MLPs, and MoE MLPs on
    moe_layers(m); each a SeededLayer keyed by its global index."""
    dense, moe = layer_spec(m), (layer_spec(m, num_experts=m.moe.num_experts) if m.moe.num_experts else None)
    on = set(moe_layers(m))

    def seeded(i: int) -> ModuleSpec:
        spec = copy.copy(moe if i in on else dense)
        return ModuleSpec(module=SeededLayer, params={**spec.params, "seed": seed, "index": i},
                          submodules=spec.submodules)

    return TransformerBlockSubmodules(layer_specs=[seeded(i) for i in (layers or range(m.num_layers))],
                                      layer_norm=TorchNorm)


def expert_seed(seed: int, layer: int, expert: int) -> int:
    return (seed * 1_000_003 + layer * 10_007 + expert) % (1 << 63)


def seed_experts(model: GPTModel, seed: int) -> None:
    """Each expert's weights drawn from its own generator, seeded by (seed, layer, global expert index),
    as full single-process tensors then split for tensor parallelism: the initial model depends on the
    seed only, never on the expert- or tensor-parallel layout (as use_cpu_initialization does for TP)."""
    from gorilla_dist.engine.state import full_shape, tp_local

    config = model.config
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for local_i, layer in enumerate(model.decoder.layers):
            if not isinstance(layer.mlp, MoELayer):
                continue
            for local, g in enumerate(layer.mlp.local_expert_indices):
                torch.manual_seed(expert_seed(seed, layer.layer_number - 1, g))  # the global layer index
                expert = layer.mlp.experts.local_experts[local]
                prefix = f"decoder.layers.{local_i}.mlp.experts.local_experts.{local}."
                for name, p in expert.named_parameters():
                    full = torch.zeros(full_shape(model, prefix + name, p), dtype=torch.float32)
                    if not name.endswith("bias"):
                        (config.output_layer_init_method if "linear_fc2" in name else config.init_method)(full)
                    p.copy_(tp_local(model, prefix + name, p, full))


def share_layers(model: GPTModel, sets: list[int], *, share_norms: bool) -> None:
    """Every layer using weight set j takes the parameter objects of the first layer using it (the module
    structure stays: each position keeps its own module, layer_number and non-parameter state). Done
    before any gradient hook, so a shared parameter gets each hook once."""
    layers, owner = model.decoder.layers, {}
    for i, j in enumerate(sets):
        if owner.setdefault(j, i) == i:
            continue
        source = layers[owner[j]]
        for name, _ in list(layers[i].named_parameters()):
            if not share_norms and "layernorm" in name:
                continue
            path, _, attr = name.rpartition(".")
            setattr(layers[i].get_submodule(path) if path else layers[i], attr, source.get_parameter(name))


class GPT(GPTModel):
    """megatron-core's GPTModel; with pipeline stages and tied embeddings, the last stage's copy of the word
    embeddings is set up without megatron's move to CUDA (engine/megatron_cpu.py, 10).

    Interleaved pipeline (parallel.pp_schedule=interleaved): one GPT holds all of its rank's model chunks, its
    decoder.layers their layers in order (each under its global layer_number, so names, seeds, checkpoints and
    adapters are those of any other layout), and chunk_view(c) makes it chunk c for a forward and its backward:
    its layers only, the embeddings only on the first chunk of the first rank, the final norm and output layer
    only on the last chunk of the last rank (engine/chunks.py)."""

    chunk_sizes: list[int] | None = None
    viewing: bool = False  # (set by chunk_view)

    def setup_embeddings_and_output_layer(self) -> None:
        if self.config.pipeline_model_parallel_size == 1 or not self.share_embeddings_and_output_weights:
            return super().setup_embeddings_and_output_layer()
        tie_stage_embeddings(self)

    def forward(self, *args, **kwargs):
        if self.chunk_sizes is not None and not self.viewing:
            raise RuntimeError("a model of several pipeline chunks runs inside chunk_view(c) only")
        return super().forward(*args, **kwargs)

    def chunk_view(self, c: int):
        """The model as megatron would have built chunk `c` alone, for a forward and its backward (full
        activation checkpointing finds its layers again by index when it recomputes); engine/chunks.py. A no-op
        for a single chunk."""
        if self.chunk_sizes is None:
            return contextlib.nullcontext()
        return chunk_view(self, self.chunk_sizes, c)


def build_model(m: ModelConfig, *, vocab_size: int, dtype: str, device: torch.device, seed: int,
                parallel: ParallelConfig | None = None, finetune: FinetuneConfig | None = None,
                heads: dict[str, int] | None = None, construct=None) -> GPTModel:
    """A GPTModel on `device` for a tokenizer of `vocab_size` ids. The initial weights depend only on
    (m, vocab_size, seed), never on the tensor-parallel layout. `parallel` (a ParallelConfig):
    sequence parallelism and activation checkpointing; None: neither. `finetune`: its adapters (LoRA)
    are added here, with the model's other modules (which parameters train is finetune.apply_finetune's),
    and its classification head (the model then returns (b, s, num_labels) class scores: model/head.py).
    `heads`: the pretraining objectives' auxiliary heads, {objective: classes} (objectives.head_sizes).
    `construct`: a context the megatron model is created in (engine.partitioned_construction: ZeRO-3's
    parameters partitioned as they are made); the modules added after it are partitioned by DeepSpeed later."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    sp = bool(parallel is not None and parallel.sequence_parallel)
    recompute = parallel.activation_checkpointing if parallel is not None else "none"
    reason = attention_kernel(m.attention).check_build(device, TORCH_DTYPES[dtype])  # at build, not at the first step
    if reason:
        raise ConfigError(f"model.attention={m.attention} {reason}")
    if m.moe.num_experts:
        cpu_moe()
        reset_aux_loss_tracker()
    torch.manual_seed(seed)
    seed_rng_tracker(seed, device)
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    split = (list(parallel.pp_layers) if parallel is not None and parallel.pp_layers else None,
             parallel.pp_virtual if parallel is not None else 1)
    # the global layers of each rank's model chunks (one chunk each without interleaving)
    chunks = [stage_chunks(m.num_layers, pp, r, *split) for r in range(pp)]
    try:
        with construct if construct is not None else contextlib.nullcontext():
            model = GPT(
                # Explicit process groups, as megatron-core asks (it deprecates looking them up implicitly).
                # RowParallelLinear still passes tp_group=None internally; engine/megatron_cpu.py covers that.
                pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                config=transformer_config(m, tp=ps.get_tensor_model_parallel_world_size(), dtype=dtype, seed=seed,
                                          sequence_parallel=sp, activation_checkpointing=recompute,
                                          ep=ps.get_expert_model_parallel_world_size(),
                                          stages=[sum(map(len, c)) for c in chunks]),
                # a pipeline stage builds its own layers only (global indices: their seeds and names)
                transformer_layer_spec=block_spec(m, seed=seed, layers=[i for c in chunks[stage] for i in c]),
                vocab_size=padded_vocab_size(vocab_size),
                max_sequence_length=m.seq_length,
                pre_process=stage == 0,
                post_process=stage == pp - 1,
                share_embeddings_and_output_weights=m.tie_embeddings,
                # ALiBi lives in core_attention (gorilla_dist/kernels/alibi.py): megatron adds no position
                # embedding then.
                position_embedding_type="none" if m.position_embedding == "alibi" else m.position_embedding,
                rotary_base=m.rotary_base,
                parallel_output=True,
            )
    except UnsupportedAttention as err:  # a kernel's limit, named in the config's words
        raise ConfigError(f"model.attention={m.attention}: {err}") from None
    if len(chunks[stage]) > 1:
        model.chunk_sizes = [len(c) for c in chunks[stage]]
    if m.moe.num_experts:
        seed_experts(model, seed)
    sets = layer_weight_sets(m.num_layers, m.sharing.unique_layers, m.sharing.pattern)
    if len(set(sets)) < m.num_layers:
        share_layers(model, sets, share_norms=m.sharing.share_norms)
        if m.sharing.lora_rank:
            add_deltas(model, m.sharing.lora_rank, seed=seed, weight_decay=m.sharing.delta_weight_decay)
    if heads:
        attach_objective_heads(model, heads, seed=seed)
    if finetune is not None and finetune.head == "classification":  # (its hook runs before the prompt's)
        if finetune.num_labels < 1:
            raise ConfigError("finetune.head=classification: finetune.num_labels is not known yet (the run fills it "
                              "from the data: finetune.resolve_labels)")
        attach_classifier(model, finetune.num_labels, seed=seed)
    if finetune is not None and finetune.method == "prompt":
        attach_soft_prompt(model, finetune.virtual_tokens)
    if finetune is not None and finetune.method == "prefix":
        attach_prefix(model, finetune.virtual_tokens, finetune.prefix_projection, seed=seed)
    if finetune is not None and finetune.method == "lora":
        lo = finetune.lora
        attach_low_rank(model, lo.rank, prefix="lora", linears=[p for p in LINEARS if p.rsplit(".", 1)[1] in lo.targets],
                        seed=seed, scale=lo.alpha / lo.rank, dropout=lo.dropout)
    mask_vocab_padding(model, vocab_size, tp_rank=ps.get_tensor_model_parallel_rank(),
                       tp_size=ps.get_tensor_model_parallel_world_size())
    adapt_model(model, device, sequence_parallel=sp)
    return model.to(device)


def flops_per_token(m, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM/Megatron MFU
    convention: 6 * matmul parameters + 12 * layers * width * sequence for attention scores. With
    experts, the parameters a token really passes through: the router, its top-k experts and the
    shared expert (the active parameters), not all experts."""
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    kv = (m.num_query_groups or m.num_heads) * (h // m.num_heads)
    mlp_matrices = 3 if m.activation == "swiglu" else 2
    ffn = m.ffn_hidden_size or 4 * h
    attention = h * (h + 2 * kv) + h * h
    n_moe = len(moe_layers(m))
    e = m.moe
    moe_mlp = (e.num_experts * h + mlp_matrices * h * (e.topk * (e.ffn_hidden_size or ffn) + e.shared_expert_size)
               if n_moe else 0)
    matmul_params = (L * attention + (L - n_moe) * mlp_matrices * h * ffn + n_moe * moe_mlp
                     + h * padded_vocab_size(vocab_size))
    return 6.0 * matmul_params + 12.0 * L * h * s
