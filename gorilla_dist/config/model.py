"""model: the architecture (sizes, positions, attention, sharing, experts) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError
from gorilla_dist.kernels.limits import UnsupportedAttention
from gorilla_dist.kernels.registry import attention_kernel, missing

POSITIONS = ("rope", "learned_absolute", "alibi")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
SHARING_PATTERNS = ("sequence", "cycle", "cycle_rev")
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_DISPATCHERS = ("alltoall", "allgather")


@dataclass
class SparseConfig:
    """Sizes of the block-sparse attention layouts (model.attention=sliding|strided|bigbird|learned),
    counted in blocks of block_size tokens."""

    block_size: int = 64
    """Tokens per block (a power of two, 16-128); model.seq_length must be a multiple of it."""
    window: int = 4
    """sliding, strided, bigbird: the local window, in blocks, including the query's own block."""
    stride: int = 8
    """strided: chunk length; each query block also sees the last block of every earlier chunk."""
    global_blocks: int = 1
    """bigbird: the first this-many key blocks are seen by every query block."""
    random_blocks: int = 2
    """bigbird: further earlier key blocks per query block, drawn per head from `seed`."""
    seed: int = 0
    """bigbird: seed of the random blocks (fixed across ranks and resumes)."""
    topk: int = 8
    """learned: key blocks per query block, the forced ones (own block, first block) included."""
    keep_first: bool = True
    """learned: always keep the first block (an attention sink), besides the query's own."""


@dataclass
class SharingConfig:
    """Cross-layer parameter sharing (Takase & Kiyono 2021): num_layers layers use unique_layers weight
    sets, each shared parameter one tensor (one gradient, one optimizer state, one checkpoint entry)."""

    unique_layers: int | None = None
    """Weight sets M for the model's N layers; None means N (no sharing); 1 shares one layer everywhere
    (ALBERT, Universal Transformer)."""
    pattern: str = "cycle_rev"
    """Which set layer i uses (N = 6, M = 3): sequence 0 0 1 1 2 2 (layer i: floor(i*M/N), also when M does
    not divide N) | cycle 0 1 2 0 1 2 (i mod M) | cycle_rev 0 1 2 2 1 0 (cycle for the first N-M layers,
    then the M sets in reverse)."""
    share_norms: bool = True
    """Share the layers' norm weights too (false: every layer keeps its own norms)."""
    lora_rank: int = 0
    """Relaxed sharing (Relaxed Recursive Transformers): every layer adds its own rank-r delta B A (B zero at
    init) to each linear of its attention and dense MLP; 0: off."""
    delta_weight_decay: float = 0.1
    """AdamW weight decay on the deltas (pulls each layer back towards the shared weights)."""


@dataclass
class MoEConfig:
    """Mixture of experts (megatron-core's MoELayer): some MLPs become `num_experts` expert MLPs and a
    router sending each token to `topk` of them. Off when num_experts is 0."""

    num_experts: int = 0
    """Experts per MoE layer; 0: a dense model (every other key here is ignored)."""
    topk: int = 2
    """Experts each token is routed to."""
    every: int = 1
    """Layer i has an MoE MLP when i % every == 0 (1: every layer; 2: layers 0, 2, 4, ...), the others a
    dense MLP of model.ffn_hidden_size."""
    ffn_hidden_size: int | None = None
    """Inner width of each expert's MLP; None means the dense MLP's (model.ffn_hidden_size or 4 * hidden)."""
    shared_expert_size: int = 0
    """Inner width of an always-active shared expert MLP beside the routed ones (DeepSeek / Qwen-MoE);
    0: none."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(w . x), a learned per-token gate (Qwen-MoE)."""
    router: str = "softmax"
    """softmax: top-k of the softmax scores, renormalised over the chosen k (Mixtral; topk=1 keeps the
    softmax probability, as Switch) | sigmoid: sigmoid scores, the chosen k normalised to sum 1
    (DeepSeek-V3)."""
    aux_loss_coeff: float = 1e-2
    """Load-balancing loss (Switch / GShard): coeff * E * sum_i f_i * P_i per MoE layer, f_i the fraction
    of routed tokens that went to expert i and P_i its mean router probability; 0 disables."""
    z_loss_coeff: float = 1e-3
    """Router z-loss (ST-MoE): coeff * mean over tokens of logsumexp(router logits)^2; 0 disables."""
    expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3, needs router=sigmoid): a per-expert bias added to the scores
    for the top-k choice only, moved by bias_update_rate * sign(mean load - load) after every step,
    outside the gradient."""
    bias_update_rate: float = 1e-3
    """Step of the expert_bias update."""
    capacity_factor: float | None = None
    """None: dropless (every routed token is computed). A number c: each expert takes at most
    c * tokens * topk / num_experts tokens per micro-batch; the lowest-probability assignments beyond that
    are dropped (megatron's "probs" policy) and the dropped fraction is logged."""
    dispatcher: str = "alltoall"
    """How tokens reach the experts of other expert-parallel ranks: alltoall | allgather (megatron's
    token dispatchers; both give the same result)."""


@dataclass
class ModelConfig:
    name: str = MISSING
    """Name of the size preset this config came from (conf/model/<name>.yaml)."""
    num_layers: int = MISSING
    """Number of transformer layers."""
    hidden_size: int = MISSING
    """Model width (d_model)."""
    num_heads: int = MISSING
    """Attention heads; must be divisible by parallel.tp."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per query head (MHA)."""
    ffn_hidden_size: int | None = None
    """MLP inner width; None means 4 * hidden_size."""
    seq_length: int = MISSING
    """Training context length (tokens per sample)."""
    position_embedding: str = "rope"
    """Positions: rope (rotary) | alibi (linear distance penalty in attention) | learned_absolute."""
    rotary_base: int = 10000
    """RoPE base period."""
    normalization: str = "LayerNorm"
    """LayerNorm | RMSNorm."""
    norm_eps: float = 1e-5
    """The normalization's epsilon (Hugging Face models bring their own: checkpoint.init_from=hf:)."""
    activation: str = "gelu"
    """MLP activation: gelu | swiglu (gated)."""
    bias: bool = False
    """Bias terms in linear layers."""
    dropout: float = 0.0
    """Dropout on hidden states and attention probabilities."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections are scaled by depth)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    attention: str = "dense"
    """core_attention: dense (flash-attn on GPU when installed, else SDPA) | flash (flash-attn or an
    error) | sliding | strided | bigbird (static block-sparse) | learned (learned top-k blocks)."""
    sparse: SparseConfig = field(default_factory=SparseConfig)
    """Block sizes and pattern sizes for the block-sparse attentions."""
    sharing: SharingConfig = field(default_factory=SharingConfig)
    """Cross-layer parameter sharing (off by default)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of experts (off by default)."""


def layer_weight_sets(num_layers: int, unique: int | None, pattern: str) -> list[int]:
    """Which weight set each layer uses (model.sharing): for N = 6, M = 3, sequence 0 0 1 1 2 2, cycle
    0 1 2 0 1 2, cycle_rev 0 1 2 2 1 0."""
    n, m = num_layers, unique or num_layers
    if pattern == "sequence":
        return [i * m // n for i in range(n)]
    if pattern == "cycle" or n <= m:
        return [i % m for i in range(n)]
    return [i % m for i in range(n - m)] + list(range(m - 1, -1, -1))  # cycle_rev


def _validate_sharing(m, p) -> None:
    sh = m.sharing
    choice(sh.pattern, SHARING_PATTERNS, "model.sharing.pattern")
    positive(sh.lora_rank, "model.sharing.lora_rank", allow_zero=True)
    positive(sh.delta_weight_decay, "model.sharing.delta_weight_decay", allow_zero=True)
    if sh.unique_layers is None or sh.unique_layers == m.num_layers:
        if sh.lora_rank:
            raise ConfigError(f"model.sharing.lora_rank={sh.lora_rank} relaxes shared weights, but no layers share "
                              f"(model.sharing.unique_layers={sh.unique_layers}, model.num_layers={m.num_layers}); set "
                              "unique_layers < num_layers, or lora_rank=0")
        return
    if not 1 <= sh.unique_layers <= m.num_layers:
        raise ConfigError(f"model.sharing.unique_layers={sh.unique_layers} must be in [1, model.num_layers="
                          f"{m.num_layers}] (or null: no sharing)")
    if sh.lora_rank and m.moe.num_experts:
        raise ConfigError(f"model.sharing.lora_rank={sh.lora_rank} with model.moe: per-layer deltas on experts are not "
                          "built; use lora_rank=0 (experts are shared as they are) or a dense model")
    if p.activation_checkpointing == "full" and p.zero_stage >= 2:
        raise ConfigError(f"model.sharing.unique_layers={sh.unique_layers} with parallel.activation_checkpointing=full "
                          f"and parallel.zero_stage={p.zero_stage}: megatron's full recompute runs each layer in its "
                          "own segment, so a shared weight's gradient arrives twice and DeepSpeed's ZeRO-2/3 reduce "
                          "it twice; use activation_checkpointing=selective or zero_stage<=1")


def moe_layers(m) -> list[int]:
    """Indices of the layers whose MLP is a mixture of experts (megatron's moe_layer_freq rule)."""
    if not m.moe.num_experts:
        return []
    return [i for i in range(m.num_layers) if i % m.moe.every == 0]


def _validate_moe(m, p, dtype: str = "fp32") -> None:
    e = m.moe
    positive(e.num_experts, "model.moe.num_experts", allow_zero=True)
    positive(p.ep, "parallel.ep")
    if not e.num_experts:
        if p.ep != 1:
            raise ConfigError(f"parallel.ep={p.ep} splits experts over ranks, but model.moe.num_experts=0 (a dense "
                              "model); set model.moe.num_experts or parallel.ep=1")
        return
    choice(e.router, MOE_ROUTERS, "model.moe.router")
    choice(e.dispatcher, MOE_DISPATCHERS, "model.moe.dispatcher")
    if not 1 <= e.topk <= e.num_experts:
        raise ConfigError(f"model.moe.topk={e.topk} must be in [1, model.moe.num_experts={e.num_experts}]")
    if not 1 <= e.every <= m.num_layers:
        raise ConfigError(f"model.moe.every={e.every} must be in [1, model.num_layers={m.num_layers}]")
    for key in ("aux_loss_coeff", "z_loss_coeff", "shared_expert_size", "bias_update_rate"):
        positive(getattr(e, key), f"model.moe.{key}", allow_zero=True)
    if e.ffn_hidden_size is not None:
        positive(e.ffn_hidden_size, "model.moe.ffn_hidden_size")
    if e.capacity_factor is not None and not e.capacity_factor > 0:
        raise ConfigError(f"model.moe.capacity_factor={e.capacity_factor} must be > 0 (or null: dropless)")
    if e.shared_expert_gate and not e.shared_expert_size:
        raise ConfigError("model.moe.shared_expert_gate=true gates the shared expert, but model.moe.shared_expert_size=0 "
                          "(none); set a width")
    if e.expert_bias and e.router != "sigmoid":
        raise ConfigError("model.moe.expert_bias=true (DeepSeek-V3's aux-loss-free balancing) needs "
                          f"model.moe.router=sigmoid, not {e.router}")
    if e.expert_bias and e.capacity_factor is not None:
        raise ConfigError("model.moe.expert_bias=true with model.moe.capacity_factor: megatron drops tokens only "
                          "with the aux-loss balancing; use one or the other")
    for key, width in (("ffn_hidden_size", e.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size),
                       ("shared_expert_size", e.shared_expert_size)):
        if width % p.tp:
            raise ConfigError(f"model.moe.{key}({width}) is not divisible by parallel.tp({p.tp})")
    if e.num_experts % p.ep:
        raise ConfigError(f"model.moe.num_experts({e.num_experts}) is not divisible by parallel.ep({p.ep}); "
                          f"valid ep values: {[d for d in range(1, e.num_experts + 1) if e.num_experts % d == 0]}")
    if p.ep > 1 and p.zero_stage == 0 and dtype != "fp32":
        raise ConfigError(f"parallel.ep={p.ep} with precision.dtype={dtype} and parallel.zero_stage=0: DeepSpeed's "
                          f"{dtype} optimizer at ZeRO-0 leaves expert gradients out of the norm it clips by; use "
                          "parallel.zero_stage=1 (or higher), or precision=fp32")
    if p.tp > 1 and not p.sequence_parallel:
        raise ConfigError(f"model.moe with parallel.tp={p.tp} needs parallel.sequence_parallel=true (as megatron "
                          "requires): each tensor-parallel rank then routes its own slice of the sequence, and the "
                          "aux losses are computed over the tokens once")
    if m.bias and p.tp > 1:
        raise ConfigError("model.bias=true with model.moe and parallel.tp>1: megatron-core supports expert biases "
                          "only without tensor-parallel experts; use model.bias=false or parallel.tp=1")
    sets = layer_weight_sets(m.num_layers, m.sharing.unique_layers, m.sharing.pattern)
    moe = set(moe_layers(m))
    for j in set(sets):
        users = [i for i, s in enumerate(sets) if s == j]
        if len({i in moe for i in users}) > 1:
            raise ConfigError(f"model.sharing (pattern={m.sharing.pattern}, unique_layers={m.sharing.unique_layers}) "
                              f"gives layers {users} one weight set, but model.moe.every={m.moe.every} makes "
                              f"{[i for i in users if i in moe]} MoE and the others dense; choose an `every` and a "
                              "pattern whose shared layers are of one kind")


def _validate_attention(m) -> None:
    """model.attention: a registered kernel (kernels/registry.py), its own checks, and what the model asks of it
    that it declares it does not support."""
    try:
        kernel = attention_kernel(m.attention)
        kernel.check(m)
    except UnsupportedAttention as err:
        raise ConfigError(str(err)) from None
    if m.dropout and not kernel.supports.dropout:
        raise ConfigError(f"model.dropout={m.dropout}: model.attention={m.attention} has no attention dropout; "
                          "set model.dropout=0 or use model.attention=dense")
    if m.position_embedding == "alibi" and not kernel.supports.alibi:
        raise ConfigError(f"model.position_embedding=alibi: {missing(kernel, 'alibi', m)}")


def check_model(m, p, d, dtype: str) -> None:
    """model: sizes and choices, the sparse layouts, sharing and experts, and how the sizes split over
    parallel.tp (p: the parallel section, d: the data section, dtype: precision.dtype)."""
    for key in ("num_layers", "hidden_size", "num_heads", "seq_length"):
        positive(getattr(m, key), f"model.{key}")
    positive(m.dropout, "model.dropout", allow_zero=True)
    choice(m.position_embedding, POSITIONS, "model.position_embedding")
    choice(m.normalization, NORMALIZATIONS, "model.normalization")
    choice(m.activation, ACTIVATIONS, "model.activation")
    _validate_attention(m)
    _validate_sharing(m, p)
    _validate_moe(m, p, dtype)
    if m.dropout >= 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be < 1")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size({m.hidden_size}) is not divisible by model.num_heads({m.num_heads})")
    groups = m.num_query_groups or m.num_heads
    if m.num_heads % groups:
        raise ConfigError(f"model.num_heads({m.num_heads}) is not divisible by model.num_query_groups({groups})")
    if m.num_heads % p.tp:
        raise ConfigError(f"model.num_heads({m.num_heads}) is not divisible by parallel.tp({p.tp}); "
                          f"valid tp values: {[d for d in range(1, m.num_heads + 1) if m.num_heads % d == 0]}")
    if groups % p.tp:
        raise ConfigError(f"model.num_query_groups({groups}) is not divisible by parallel.tp({p.tp})")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    if ffn % p.tp:
        raise ConfigError(f"model.ffn_hidden_size({ffn}) is not divisible by parallel.tp({p.tp})")
    if p.sequence_parallel and m.seq_length % p.tp:
        raise ConfigError(f"model.seq_length({m.seq_length}) is not divisible by parallel.tp({p.tp}), which "
                          "parallel.sequence_parallel=true needs")
