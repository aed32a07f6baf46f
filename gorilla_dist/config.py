"""Typed configuration: one dataclass per concern, registered with Hydra's ConfigStore.

The launcher composes these with the YAML groups in `conf/` and CLI overrides (struct mode: a typo'd
key is an error), calls `validate()` once, and writes the resolved config to `run.dir/config.yaml`.
Workers read only that file (`load_run_config`). This module imports nothing heavy: the launcher
uses it without importing torch or model code.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from gorilla_dist.data.format import VERIFY
from gorilla_dist.errors import ConfigError
from gorilla_dist.files import write_text_atomic
from gorilla_dist.hf_import import PREFIX as HF_PREFIX
from gorilla_dist.hf_import import hf_dir, max_positions, model_fields, read_config
from gorilla_dist.kernels.limits import BLOCK_SIZES

PRECISIONS = ("fp32", "bf16", "fp16")
POSITIONS = ("rope", "learned_absolute", "alibi")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
SPARSE_ATTENTIONS = ("sliding", "strided", "bigbird", "learned")
ATTENTIONS = ("dense", "flash", *SPARSE_ATTENTIONS)
SHARING_PATTERNS = ("sequence", "cycle", "cycle_rev")
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_DISPATCHERS = ("alltoall", "allgather")
SAMPLE_BY = ("document", "paragraph", "line")
BACKENDS = ("local", "torchrun", "deepspeed", "slurm")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE = ("skip", "stop")
WANDB_MODES = ("offline", "online", "disabled")
SCHEDULES = ("cosine", "constant")
RECOMPUTE = {"none": {},
             # megatron-core's selective recompute: the core attention (scores, softmax) of every layer
             "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
             # every layer: only its input is kept; the layer runs again in the backward
             "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}
"""parallel.activation_checkpointing: each choice and the megatron-core TransformerConfig fields it sets."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints/, data cache, W&B files."""
    seed: int = 1337
    """Seeds model init, data order and dropout; a run is a deterministic function of its config."""
    name: str | None = None
    """Human-readable run name (W&B); defaults to the run directory's name."""


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


@dataclass
class ParallelConfig:
    device: str = "auto"
    """auto (a GPU per rank when torch sees one, else the CPU) | cpu (even on a GPU machine) | cuda (refused
    where there is none). With a GPU, rank i of a node uses GPU i: at most as many ranks per node as GPUs."""
    tp: int = 1
    """Tensor-parallel size (megatron-core column/row parallel layers). Data parallel = world / tp."""
    ep: int = 1
    """Expert-parallel size (model.moe): each MoE layer's experts are split over `ep` ranks of a
    data-parallel group, which exchange tokens; expert weights are then reduced and partitioned over the
    world / (tp * ep) ranks holding the same experts. Must divide the data-parallel size and
    model.moe.num_experts."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 over the data-parallel group: 1 partitions the optimizer state (and
    the fp32 master weights), 2 also the gradients, 3 also the parameters."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1): norms, dropout and residuals run on 1/tp of the
    sequence per rank, dividing their activation memory by tp."""
    activation_checkpointing: str = "none"
    """Recompute activations in the backward instead of keeping them: none | selective (each layer's
    core attention) | full (each layer keeps only its input)."""
    timeout_s: float = 600.0
    """A collective (all-reduce, broadcast, barrier) that does not complete within this many seconds
    ends the job with a message naming the rank and the operation, instead of hanging forever."""
    census_grace_s: float = 10.0
    """After a collective failed, each survivor asks the others through the rendezvous store whether they are
    alive and waits this long for answers, to name the ranks and hosts that are gone (exit 69)."""
    rendezvous_timeout_s: float = 300.0
    """At start, rank 0 waits this long for every rank to join, the others this long to reach rank 0's
    address (MASTER_ADDR, or the first node of a Slurm job); then the job ends with a message naming the
    address and the ranks missing."""
    socket_ifname: str | None = None
    """Network interface the ranks talk over (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), e.g. ib0 or eth0,
    when the host name resolves to the wrong one; a comma-separated list is allowed. None: the address
    the host name resolves to (gloo), NCCL's own choice."""


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    """Training precision: fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)."""
    initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale is raised."""
    tf32: bool = True
    """On CUDA, fp32 matmuls and convolutions use TF32 tensor cores (inputs rounded to 10 mantissa bits,
    fp32 accumulation), as Megatron and most trainers do; false: full fp32. Nothing changes on a CPU."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    decay_steps: int | None = None
    """Steps of the warmup + decay schedule; None means train.max_steps."""
    schedule: str = "cosine"
    """After warmup: cosine (to min_lr) | constant."""
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to norms, biases or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


OBJECTIVES = ("clm", "classify", "contrastive", "denoise", "permute")
DENOISE_MODES = ("R", "X", "S")
CLASSIFY_TARGETS = ("source", "label")


@dataclass
class ObjectiveConfig:
    """One pretraining objective of the mixture (train.objectives): its name, its share of the samples
    (and of the loss), and its options (each applies to the objectives named in its description)."""

    name: str = MISSING
    """clm (next-token prediction) | classify (which data.sources entry a sample comes from, from its
    mean-pooled final hidden states through a linear head) | contrastive (two halves of one document of
    the sample, attending each to itself only, are a positive pair; the other contrastive samples of the
    micro-batch on every data-parallel rank — the same part of the global batch for any data-parallel
    size: 1 / (accumulation count) of it — are negatives; InfoNCE on their projected, normalised means) |
    denoise (UL2: the sample corrupted by the denoiser `mode`, input bidirectional, loss on the target;
    needs data prepared with special_tokens=objectives; give several with different modes for UL2's
    mixture of denoisers) | permute (BART's sentence permutation: the sample's sentences shuffled, then
    <|sep|>, then the original; input bidirectional, loss on the original; special_tokens=objectives)."""
    weight: float = 1.0
    """This objective's share of every window of samples and of the loss (normalised over objectives)."""
    target: str = "source"
    """classify: what to predict: source (the sample's data.sources index, from its mean-pooled hidden
    states) | label (the `label` each example got at prepare time, from the hidden state of its last
    prompt token, as finetune.head=classification reads it; every example of a packed sample counts)."""
    labels: list[str] = field(default_factory=list)
    """classify target=label: the class names in id order; filled from the data by the run (checkpoints
    record them); given, they must be the data's."""
    temperature: float = 0.1
    """contrastive: the InfoNCE temperature."""
    projection: int = 64
    """contrastive: width of the linear projection the pooled halves go through before normalising."""
    mode: str = "R"
    """denoise: R | X (span corruption: spans of mean length `mean_span` covering `rate` of the source, each
    masked by a sentinel (or replaced / deleted: `mask`, `replace`, `delete`); the target: each sentinel and
    its span) | S (prefix -> continuation: the last
    `rate` of the source is the target). UL2's settings: R mean_span 3 rate 0.15; X mean_span 32 rate 0.15
    or mean_span 3 rate 0.5; S rate 0.25. mean_span 1 is BERT-style single-token masking."""
    mean_span: float = 3.0
    """denoise (R, X): the mean length of a corrupted span, in tokens (>= 1)."""
    rate: float = 0.15
    """denoise: the share of the source tokens that become the target (0 < rate < 1)."""
    mask: float = 1.0
    """denoise (R, X): weight of masking a corrupted span (the input holds its sentinel). With `replace` and
    `delete`, each span draws one of the three in proportion to the weights."""
    replace: float = 0.0
    """denoise (R, X): weight of replacing a span by as many random tokens (drawn from the sample's own
    source), with no sentinel: the model finds the span and restores it."""
    delete: float = 0.0
    """denoise (R, X): weight of deleting a span from the input (no sentinel): the model finds where."""


@dataclass
class TrainConfig:
    max_steps: int = 2000
    """Optimizer steps to train for."""
    global_batch_size: int = 12
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch_size: int | None = None
    """Samples per rank per forward/backward; None means global_batch_size / dp (no accumulation).
    global_batch_size must be a multiple of micro_batch_size * dp; the quotient is the
    gradient-accumulation count."""
    eval_interval: int = 250
    """Evaluate validation loss every this many steps (and at the end); 0 disables."""
    eval_samples: int = 240
    """Validation samples per evaluation: the same ones (the first of the validation blend) for every
    layout, micro-batch size and accumulation, so val_loss compares across them."""
    log_interval: int = 10
    """Steps between host syncs that flush metrics and refresh the progress bar."""
    compile: bool = False
    """torch.compile the model."""
    sample_tokens: int = 200
    """Tokens to generate after training as a sample (0 disables)."""
    sample_prompt: str = "\n"
    """Prompt for the end-of-training sample."""
    nonfinite: str = "skip"
    """A step whose loss or gradient norm is inf/NaN: skip (no update; the data is consumed) or stop
    (end the run with an error). Either way a non-finite model is never saved."""
    max_skipped_steps: int = 10
    """With nonfinite=skip: stop after this many skipped steps in a row (something is broken)."""
    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig(name="clm")])
    """Pretraining objectives mixed by weight, e.g. '[{name: clm, weight: 0.9}, {name: classify, weight: 0.1}]'
    (quoted on the command line). Each sample gets one objective (a deterministic rule: every window of
    samples follows the weights within one sample, whatever the data-parallel size); the loss is the
    weighted sum of each objective's mean over the global batch; metrics.jsonl logs each objective's loss
    (gorilla_dist/objectives/). The default, clm alone, is plain language-model pretraining."""


@dataclass
class SourceConfig:
    path: str = MISSING
    """A dataset directory written by `python -m gorilla_dist.data.prepare`."""
    weight: float = 1.0
    """This source's share of the training samples (weights are normalised over the sources)."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Prepared datasets to blend, e.g. '[{path: data/web, weight: 0.7}, {path: data/code, weight: 0.3}]'.
    Empty: prepare `path` into run.dir/data and train on it."""
    path: str | None = None
    """A text file prepared into run.dir/data when `sources` is empty; None means the bundled
    tinyshakespeare corpus."""
    tokenizer: str = "char"
    """For `path`: char | byte | bpe:<vocab_size> | a Hugging Face tokenizer.json (or its directory)."""
    sample_by: str = "paragraph"
    """For `path`: what one document is: document (the file) | paragraph (blank-line separated) | line."""
    val_fraction: float = 0.1
    """Fraction of each source's documents (its last ones) held out for validation."""
    reset_at_eod: bool = False
    """Attention, position ids and the loss restart at every document boundary inside a packed sample."""
    pack: bool = True
    """Instruction data (prepared with format=instruction): several whole examples per sample, each
    attending only to itself (dense attention builds the mask); false: one example per sample, padded
    (plain causal attention: works with flash and the block-sparse layouts too)."""
    truncate: bool = False
    """Instruction data: an example longer than model.seq_length + 1 tokens is refused (false) or cut to
    its first model.seq_length + 1 tokens (true; the count is printed)."""
    verify: str = "checksum"
    """At start, check the sources' files against meta.json: checksum (sha256, ~1 s/GB) | size."""


@dataclass
class CheckpointConfig:
    interval: int = 500
    """Save every this many steps (and always at the end); 0 saves only at the end."""
    keep: int = 2
    """Complete checkpoints to keep (oldest deleted first); 0 keeps all."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in run.dir; never: start fresh
    (refuses if checkpoints exist); or the path of one checkpoint directory."""
    init_from: str | None = None
    """Fine-tuning: start this run from another run's weights — a checkpoint directory, or a run
    directory (its newest complete checkpoint). Any layout; the optimizer, LR schedule and data order
    start fresh. Only used when run.dir has no checkpoint to resume (a preempted fine-tune resumes itself)."""
    consolidated: str = "auto"
    """Besides the per-rank shards every checkpoint holds, also write the whole model's weights as one
    model.safetensors (rank 0, one tensor at a time, from the shards): true, false, or auto (when the
    fp32 weights are at most 2 GiB). Readers (resume, generate, export, consolidate) take either."""


FINETUNE_METHODS = ("full", "freeze", "lora", "prompt", "prefix")
FINETUNE_HEADS = ("none", "classification")
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoraConfig:
    rank: int = 8
    """r: the rank of each adapter (B A, with A r x in and B out x r)."""
    alpha: float = 16.0
    """The adapter's output is scaled by alpha / rank (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (PEFT's lora_dropout)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Which linears of every layer get an adapter: linear_qkv (attention's fused q, k, v), linear_proj
    (attention output), linear_fc1, linear_fc2 (the dense MLP; MoE experts get none)."""


@dataclass
class FinetuneConfig:
    """How a run adapts the model it starts from (checkpoint.init_from)."""

    method: str = "full"
    """full (every weight trains) | lora (see `lora`) | prompt (see `virtual_tokens`) | prefix (see
    `prefix_projection`) | freeze (only the parameters `trainable` selects train; the others
    keep checkpoint.init_from's values, get no gradient and no optimizer state, and checkpoints hold the
    trainable ones only, beside the base checkpoint's path and sha256)."""
    trainable: list[str] = field(default_factory=list)
    """method=freeze: regular expressions searched in the single-process parameter names (e.g.
    'decoder\\.layers\\.[23]\\.' or 'final_layernorm'); parameters matching any of them train. On the command
    line, quote a pattern with brackets: "finetune.trainable=['decoder\\.layers\\.[23]\\.']"."""
    frozen: list[str] = field(default_factory=list)
    """method=freeze, instead of `trainable`: parameters matching any of these are frozen, the rest train."""
    virtual_tokens: int = 20
    """method=prompt (Lester et al. 2021): N learned input embeddings before every sample; only they
    train (and what `trainable` names). Needs rope or ALiBi positions (the inputs grow by N)."""
    prefix_projection: int = 0
    """method=prefix (Li & Liang 2021; `virtual_tokens` keys and values per layer): 0 learns them directly;
    P > 0 computes them from N embeddings through an MLP of width P (their reparametrisation)."""
    init_text: str | None = None
    """method=prompt: initialise the virtual tokens from this text's token embeddings (repeated to N);
    default: embeddings of N random tokens of the vocabulary (seeded by run.seed)."""
    head: str = "none"
    """none (the model predicts tokens) | classification: a linear head on the last prompt token's hidden
    state scores `num_labels` classes (data prepared from rows with a `label` field); the loss is their
    cross entropy, evaluation reports accuracy, export writes a transformers *ForSequenceClassification.
    The head trains with any method (for freeze, beside what `trainable` selects)."""
    num_labels: int = 0
    """head=classification: the number of classes; 0 takes the data's (and any other number must equal it)."""
    labels: list[str] = field(default_factory=list)
    """head=classification: the class names in id order. Empty: the data's (the run records them in its
    checkpoints, for evaluate and export); given: the data must have exactly these."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """method=lora (Hu et al. 2021): low-rank adapters on megatron's tensor-parallel linears; only they
    train (and whatever `trainable` also names, e.g. final_layernorm). B starts at zero, so the first step
    computes the base model. Checkpoints hold the adapters; export merges them into the weights."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (files under run.dir/wandb, sync later) | online (needs WANDB_API_KEY) | disabled."""
    project: str = "gorilla_dist"
    entity: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA) on rank 0."""
    peak_tflops: float | None = None
    """Per-device peak TFLOP/s for MFU; None looks the device up in a small table (unknown: no MFU)."""
    plot: bool = True
    """At the end of a run draw run.dir/plot.png (python -m gorilla_dist.plot). The run's summary
    (run.dir/summary.json) is written either way, after a stop too."""
    count_syncs: bool = False
    """Count the host syncs (points where the host waits for a value from the device: .item(), .cpu(),
    a data-dependent shape) of the training steps between log intervals, by call site, into
    run.dir/summary.json `host_syncs`. None are expected; a diagnostic for a GPU that idles between
    kernels. It slows the counted steps (every operation is intercepted)."""


@dataclass
class LaunchConfig:
    backend: str = "local"
    """local (one process) | torchrun | deepspeed (this node) | slurm (sbatch; see the slurm group)."""
    nproc_per_node: int = 1
    """Worker processes per node (for slurm: tasks per node, one per GPU on GPU nodes)."""
    nnodes: int = 1
    """torchrun: nodes taking part. Run the same command on each node (same run.dir, on a filesystem every
    node sees); they meet at launch.rdzv_endpoint. Node ranks follow the nodes' host names, sorted. For
    Slurm use slurm.nodes instead."""
    rdzv_endpoint: str | None = None
    """torchrun with nnodes > 1: host:port of the rendezvous, the first node's name or address as every
    node sees it (torchrun's c10d rendezvous; that node hosts it)."""
    master_port: int | None = None
    """Rendezvous port; None picks a free one."""


@dataclass
class SlurmConfig:
    """Used by launch=slurm: the launcher writes run.dir/train.sbatch from slurm/train.sbatch and submits it."""

    nodes: int = 1
    """Nodes to allocate; world size = nodes * launch.nproc_per_node."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 for CPU-only nodes. launch.nproc_per_node ranks use GPUs 0..n-1."""
    idle_gpus: bool = False
    """Allow launch.nproc_per_node below slurm.gpus_per_node (GPUs allocated that no rank uses); refused by
    default, as a job that holds GPUs it does not use is usually a typo."""
    cpus_per_task: int | None = None
    """CPU cores per worker; None leaves it to the cluster's default."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Wall-time limit, e.g. 04:00:00 or 2-00:00:00; None uses the partition's default."""
    job_name: str | None = None
    """Defaults to run.name."""
    signal_seconds: int = 120
    """Ask Slurm for SIGUSR1 this many seconds before the time limit (--signal): the workers save a
    checkpoint at the next step boundary and the job requeues itself."""
    requeue: bool = True
    """After a stop signal and a saved checkpoint, `scontrol requeue` the job so it resumes."""
    requeue_on_failure: bool = False
    """Also requeue when a worker was lost (killed, its node died or became unreachable: the survivors exit
    69, or a task died of a signal), at most slurm.max_restarts times; the job resumes from the newest
    complete checkpoint. Errors (a bad config, a bug, bad data: exit 1 or 2) are never requeued."""
    max_restarts: int = 3
    """requeue_on_failure: requeue at most this many times (Slurm's restart count of the job)."""
    min_nodes: int | None = None
    """Start (and restart after a requeue) on as few as this many nodes when no more are free: sbatch
    --nodes=min_nodes-nodes --exclusive (whole nodes: Slurm then gives as many of the range as are free).
    The checkpoint resumes at the world size it gets with the same global batch (more accumulation
    steps), so train.global_batch_size must divide at every node count in the range."""
    extra: list[str] = field(default_factory=list)
    """More sbatch options, one per item, e.g. "slurm.extra=['--qos=high','--constraint=a100']" (quoted)."""
    submit: bool = True
    """false: write run.dir/train.sbatch and print the sbatch command without submitting."""
    wait: bool = False
    """Follow the job's log until it ends (across requeues) and exit with its status."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


# ---------------------------------------------------------------------------------------------
# Validation and derived values: computed here once, used everywhere.


def _choice(value, valid, key: str) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def world_size(cfg) -> int:
    """Ranks the launch starts (all nodes)."""
    nodes = {"slurm": cfg.slurm.nodes, "torchrun": cfg.launch.nnodes}.get(cfg.launch.backend, 1)
    return int(cfg.launch.nproc_per_node) * int(nodes)


def possible_world_sizes(cfg) -> list[int]:
    """Every world size the run may start with: with slurm.min_nodes, one per node count in the range."""
    if cfg.launch.backend != "slurm" or cfg.slurm.min_nodes is None:
        return [world_size(cfg)]
    return [int(cfg.launch.nproc_per_node) * n for n in range(cfg.slurm.min_nodes, cfg.slurm.nodes + 1)]


def _world_source(cfg, world: int | None = None) -> str:
    if cfg.launch.backend == "slurm":
        nodes = world // cfg.launch.nproc_per_node if world is not None else cfg.slurm.nodes
        count = (f"slurm.nodes({nodes})" if nodes == cfg.slurm.nodes
                 else f"{nodes} node{'s' if nodes > 1 else ''} (slurm.min_nodes={cfg.slurm.min_nodes})")
        return f"{count} * launch.nproc_per_node({cfg.launch.nproc_per_node})"
    if cfg.launch.backend == "torchrun" and cfg.launch.nnodes > 1:
        return f"launch.nnodes({cfg.launch.nnodes}) * launch.nproc_per_node({cfg.launch.nproc_per_node})"
    return "launch.nproc_per_node"


def data_parallel_size(cfg, world: int | None = None) -> int:
    return (world if world is not None else world_size(cfg)) // cfg.parallel.tp


def layer_weight_sets(num_layers: int, unique: int | None, pattern: str) -> list[int]:
    """Which weight set each layer uses (model.sharing): for N = 6, M = 3, sequence 0 0 1 1 2 2, cycle
    0 1 2 0 1 2, cycle_rev 0 1 2 2 1 0."""
    n, m = num_layers, unique or num_layers
    if pattern == "sequence":
        return [i * m // n for i in range(n)]
    if pattern == "cycle" or n <= m:
        return [i % m for i in range(n)]
    return [i % m for i in range(n - m)] + list(range(m - 1, -1, -1))  # cycle_rev


def grad_accum_steps(train, dp: int) -> int:
    """Micro-batches per rank per optimizer step (train: the TrainConfig)."""
    return train.global_batch_size // (train.micro_batch_size * dp)


def _check_min_nodes(cfg) -> None:
    n = cfg.slurm.min_nodes
    if n is None:
        return
    if cfg.launch.backend != "slurm":
        raise ConfigError(f"slurm.min_nodes={n} is for launch=slurm, not launch={cfg.launch.backend}")
    if not 1 <= n <= cfg.slurm.nodes:
        raise ConfigError(f"slurm.min_nodes={n} must be between 1 and slurm.nodes({cfg.slurm.nodes})")


def _check_nodes(launch) -> None:
    if launch.nnodes > 1 and launch.backend != "torchrun":
        hint = "use slurm.nodes" if launch.backend == "slurm" else "use launch=torchrun (or launch=slurm)"
        raise ConfigError(f"launch.nnodes={launch.nnodes} is for launch=torchrun, not launch={launch.backend}; "
                          f"{hint}")
    if launch.nnodes > 1:
        endpoint = launch.rdzv_endpoint or ""
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"launch.nnodes={launch.nnodes} needs launch.rdzv_endpoint=<host>:<port> (the first "
                              f"node's name or address and a free port, the same on every node), got "
                              f"{launch.rdzv_endpoint!r}")


SLURM_SHAPES = {
    "slurm.job_name": (r"[A-Za-z0-9_.+:@-]{1,200}", "letters, digits and . _ - + : @ (at most 200)"),
    "slurm.partition": (r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "a partition name, or several joined by commas"),
    "slurm.account": (r"[A-Za-z0-9_.-]+", "letters, digits and . _ -"),
    "slurm.time": (r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite",
                   "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (Slurm's --time)"),
    "slurm.extra": (r"--?[A-Za-z][^\s\"'`$;\\]*", "one sbatch option per item, e.g. --qos=high, with no space, "
                    "quote, $, backtick, ; or backslash"),
    "run.dir": (r"[^\s\"'`$;\\]+", "a path with no space, quote, $, backtick, ; or backslash (it is written into "
                "#SBATCH lines)"),
}
"""What launch=slurm renders into run.dir/train.sbatch, and the shapes it accepts (a full match)."""


def check_slurm_value(key: str, value: str, kind: str) -> None:
    """A value written into run.dir/train.sbatch has the shape of its kind (SLURM_SHAPES) or is refused, naming
    the key and the first character that does not belong (a control character, a quote, $, ...)."""
    pattern, shape = SLURM_SHAPES[kind]
    if re.fullmatch(pattern, value):
        return
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is None:
        bad = next((c for c in value if not re.fullmatch(r"[A-Za-z0-9_.+:@,/=\-\[\]|&*]", c)), None)
    what = ("it is not of that shape" if bad is None else
            f"it contains {'a control character ' if not bad.isprintable() else ''}{bad!r}")
    raise ConfigError(f"{key}={value!r} cannot go into run.dir/train.sbatch (launch=slurm): {what}; expected "
                      f"{shape}")


def slurm_job_name(cfg) -> str:
    """The job's name in run.dir/train.sbatch: slurm.job_name, else run.name."""
    return cfg.slurm.job_name or cfg.run.name


def _validate_slurm(cfg) -> None:
    """Nothing from the config runs as code: every value written into the job script has a shape Slurm
    accepts, and none carries a control character (a newline would start a new line of the script)."""
    s = cfg.slurm
    name_key = "slurm.job_name" if s.job_name is not None else "run.name (the job name unless slurm.job_name is set)"
    values = [(name_key, slurm_job_name(cfg), "slurm.job_name"), ("slurm.partition", s.partition, "slurm.partition"),
              ("slurm.account", s.account, "slurm.account"), ("slurm.time", s.time, "slurm.time"),
              ("run.dir", cfg.run.dir, "run.dir"), *((f"slurm.extra[{i}]", v, "slurm.extra") for i, v in enumerate(s.extra))]
    for key, value, kind in values:
        if value is not None:
            check_slurm_value(key, str(value), kind)


def validate(cfg, world: int | None = None) -> None:
    """Check that the config is consistent (types, ranges, choices, how the keys fit together), before any
    process starts and wherever a run's config is read again. Raises ConfigError naming the key, the
    value and what would be valid. Looks at no file: see check_inputs."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    if world is None:  # the launcher: every world size the run may start with (slurm.min_nodes)
        _check_min_nodes(cfg)
        for other in possible_world_sizes(cfg)[:-1]:
            validate(cfg, other)
        world = world_size(cfg)
    for key, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_heads", m.num_heads), ("model.seq_length", m.seq_length),
                       ("parallel.tp", p.tp), ("train.max_steps", t.max_steps),
                       ("train.micro_batch_size", t.micro_batch_size),
                       ("train.global_batch_size", t.global_batch_size),
                       ("launch.nproc_per_node", cfg.launch.nproc_per_node),
                       ("train.log_interval", t.log_interval), ("train.eval_samples", t.eval_samples),
                       ("parallel.timeout_s", p.timeout_s), ("train.max_skipped_steps", t.max_skipped_steps),
                       ("slurm.nodes", cfg.slurm.nodes), ("launch.nnodes", cfg.launch.nnodes),
                       ("parallel.rendezvous_timeout_s", p.rendezvous_timeout_s),
                       ("parallel.census_grace_s", p.census_grace_s)]:
        _positive(value, key)
    for key, value in [("train.eval_interval", t.eval_interval), ("checkpoint.interval", cfg.checkpoint.interval),
                       ("checkpoint.keep", cfg.checkpoint.keep), ("optim.warmup_steps", o.warmup_steps),
                       ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                       ("optim.lr", o.lr), ("optim.min_lr", o.min_lr), ("model.dropout", m.dropout),
                       ("train.sample_tokens", t.sample_tokens), ("slurm.gpus_per_node", cfg.slurm.gpus_per_node),
                       ("slurm.signal_seconds", cfg.slurm.signal_seconds),
                       ("slurm.max_restarts", cfg.slurm.max_restarts)]:
        _positive(value, key, allow_zero=True)
    _choice(cfg.precision.dtype, PRECISIONS, "precision.dtype")
    _choice(str(cfg.checkpoint.consolidated).lower(), ("auto", "true", "false"), "checkpoint.consolidated")
    _choice(m.position_embedding, POSITIONS, "model.position_embedding")
    _choice(m.normalization, NORMALIZATIONS, "model.normalization")
    _choice(m.activation, ACTIVATIONS, "model.activation")
    _choice(m.attention, ATTENTIONS, "model.attention")
    _choice(p.zero_stage, (0, 1, 2, 3), "parallel.zero_stage")
    _choice(p.activation_checkpointing, RECOMPUTE, "parallel.activation_checkpointing")
    _choice(p.device, DEVICES, "parallel.device")
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    _choice(cfg.data.sample_by, SAMPLE_BY, "data.sample_by")
    _choice(cfg.data.verify, VERIFY, "data.verify")
    _choice(cfg.launch.backend, BACKENDS, "launch.backend")
    _choice(t.nonfinite, NONFINITE, "train.nonfinite")
    _choice(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    _validate_data(cfg.data, t)
    _validate_objectives(t.objectives, cfg.data, cfg.finetune)
    _validate_finetune(cfg.finetune, cfg.checkpoint)
    if cfg.finetune.method in ("prompt", "prefix"):
        _validate_virtual_tokens(cfg.finetune.method, cfg.finetune.virtual_tokens, m, p, cfg.data)
    if cfg.finetune.method == "lora" and m.sharing.unique_layers not in (None, m.num_layers):
        raise ConfigError(f"finetune.method=lora with model.sharing.unique_layers={m.sharing.unique_layers}: adapters on "
                          "shared layers are not built (export would have to unroll the layers first); use "
                          "finetune.method=freeze or full")
    _validate_sparse(m, cfg.data)
    _validate_sharing(m, p)
    _validate_moe(m, p, world, cfg.precision.dtype)
    if m.dropout >= 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be < 1")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr({o.min_lr}) must not exceed optim.lr({o.lr})")
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
    if world % p.tp:
        raise ConfigError(f"world size {world} ({_world_source(cfg, world)}) is not divisible by parallel.tp({p.tp})")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true splits the sequence over the tensor-parallel ranks, "
                          "but parallel.tp=1; set parallel.tp > 1 or parallel.sequence_parallel=false")
    if p.sequence_parallel and m.seq_length % p.tp:
        raise ConfigError(f"model.seq_length({m.seq_length}) is not divisible by parallel.tp({p.tp}), which "
                          "parallel.sequence_parallel=true needs")
    _check_nodes(cfg.launch)
    if cfg.launch.backend == "slurm":
        _validate_slurm(cfg)
    if cfg.launch.backend == "local" and world != 1:
        raise ConfigError(f"launch.backend=local starts one process but launch.nproc_per_node={world}; "
                          "use launch=torchrun or launch=deepspeed for several")
    dp = world // p.tp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size({t.micro_batch_size}) * data_parallel({dp}) = {t.micro_batch_size * dp}"
            + (f" (at world size {world}: {_world_source(cfg, world)})" if cfg.slurm.min_nodes is not None else ""))


def check_inputs(cfg) -> None:
    """The inputs a training run reads exist: data.path, data.tokenizer (a file), data.sources,
    checkpoint.resume (a directory). Run by the launcher and by each worker before training; not by
    generate, evaluate or export, which need only the run's own files (its config, tokenizer and
    checkpoints), so they keep working after a run's data was moved or deleted. checkpoint.init_from is
    checked where it is used (a run's first start only)."""
    d = cfg.data
    if d.path is not None and not Path(d.path).is_file():
        raise ConfigError(f"data.path={d.path!r}: no such file")
    tok = d.tokenizer
    if tok not in ("char", "byte") and not tok.startswith("bpe:") and not Path(tok).exists():
        raise ConfigError(f"data.tokenizer={tok!r}: expected char, byte, bpe:<vocab_size>, or the path of a "
                          "Hugging Face tokenizer.json (or its directory)")
    for i, src in enumerate(d.sources):
        if not Path(src.path).is_dir():
            raise ConfigError(f"data.sources[{i}].path={src.path!r}: no such directory (prepare one with "
                              "python -m gorilla_dist.data.prepare input=... output=...)")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise ConfigError(f"checkpoint.resume={resume!r}: expected auto, never, or an existing checkpoint directory")


def check_before_start(cfg) -> None:
    """What the launcher can know before it writes into run.dir or starts a process: run.dir is a directory
    (or new), checkpoint.resume=never meets no checkpoints, checkpoint.init_from holds one (first start
    only), and the GPU-only options meet a GPU (on this machine, or slurm.gpus_per_node for a job)."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir!r} is a file; a run directory (new or existing) is expected")
    started = has_checkpoints(run_dir)
    if cfg.checkpoint.resume == "never" and started:
        raise ConfigError(f"checkpoint.resume=never but {run_dir / 'checkpoints'} already holds checkpoints; use a "
                          "new run.dir or checkpoint.resume=auto (nothing was changed)")
    source = cfg.checkpoint.init_from
    if source is not None and hf_dir(source) is None and not started:  # a restart resumes its own checkpoints
        check_init_source(source)
    if cfg.launch.backend == "slurm":
        gpus, where = cfg.slurm.gpus_per_node, f"the job asks for slurm.gpus_per_node={cfg.slurm.gpus_per_node}"
    else:
        from gorilla_dist.runtime import visible_gpus

        gpus, where = visible_gpus(), "this machine has no GPU visible (no /dev/nvidiaN, or CUDA_VISIBLE_DEVICES)"
    device = cfg.parallel.device
    if device == "cpu":
        gpus, where = 0, "parallel.device=cpu"
    elif device == "cuda" and not gpus:
        raise ConfigError(f"parallel.device=cuda but {where}; use parallel.device=cpu or auto")
    per_node = cfg.launch.nproc_per_node
    if gpus and per_node > gpus:  # rank i of a node takes GPU i
        raise ConfigError(f"launch.nproc_per_node={per_node} ranks per node, but "
                          + (f"slurm.gpus_per_node={gpus}" if cfg.launch.backend == "slurm" else
                             f"this machine has {gpus} GPU{'s' if gpus > 1 else ''} visible")
                          + f": each rank needs its own GPU; set launch.nproc_per_node<={gpus}, or parallel.device=cpu")
    if cfg.launch.backend == "slurm" and gpus and per_node < gpus and not cfg.slurm.idle_gpus:
        raise ConfigError(f"launch.nproc_per_node={per_node} ranks per node, but slurm.gpus_per_node={gpus}: "
                          f"{gpus - per_node} allocated GPU{'s' if gpus - per_node > 1 else ''} per node would stay "
                          f"idle; set launch.nproc_per_node={gpus} (one rank per GPU), or slurm.idle_gpus=true")
    if not gpus and cfg.precision.dtype == "fp16":
        raise ConfigError(f"precision.dtype=fp16 needs a GPU (DeepSpeed has fp16 training on GPUs only) and {where}; "
                          "use precision=bf16 or precision=fp32")
    if cfg.model.attention == "flash":
        from gorilla_dist.runtime import has_package

        if not has_package("flash_attn"):
            raise ConfigError("model.attention=flash needs the flash-attn package (pip install -e '.[gpu]' on a CUDA "
                              "machine); model.attention=dense uses flash-attn when it can and SDPA otherwise")
        if not gpus:
            raise ConfigError(f"model.attention=flash needs a GPU and {where}; model.attention=dense runs SDPA here")


def check_init_source(source: str) -> None:
    """checkpoint.init_from=<dir> (not hf:) holds a checkpoint: it is one (its manifest.json) or a run directory
    that saved one. The launcher checks it before start, the worker again when it loads it."""
    src = Path(source)
    if not src.is_dir():
        raise ConfigError(f"checkpoint.init_from={source!r}: no such directory; expected a run directory, one of "
                          "its checkpoints (run.dir/checkpoints/step_XXXXXXXX) or hf:<transformers directory>")
    if not (src / "manifest.json").is_file() and not has_checkpoints(src):
        raise ConfigError(f"checkpoint.init_from={source!r} holds no complete checkpoint (no manifest.json in it "
                          "or in checkpoints/step_*/); expected a run directory that saved one, or a checkpoint")


def check_checkpoint_source(run_dir: str | os.PathLike | None, which: str = "latest") -> None:
    """What generate / evaluate / export / consolidate read exists: a run directory (its config.yaml) and,
    for checkpoint=<dir>, that directory; torch-free, so the tools check it before importing torch.
    Whether a checkpoint is complete and intact is checkpoint.resolve_checkpoint's."""
    if which != "latest":
        if not Path(which).is_dir():
            raise ConfigError(f"checkpoint={which}: no such directory; expected one of a run's checkpoints "
                              "(run.dir/checkpoints/step_XXXXXXXX), or checkpoint=latest (the default)")
        return
    if run_dir is None:
        raise ConfigError("run.dir=<run directory> is required")
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run.dir={run_dir}: no such directory")
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"run.dir={run_dir} is not a run directory (no config.yaml; runs are started with "
                          f"python -m launcher run.dir={run_dir})")


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """run_dir/checkpoints holds a finished save (its manifest.json is written last)."""
    return any(Path(run_dir).glob("checkpoints/step_*/manifest.json"))


def _validate_sharing(m, p) -> None:
    sh = m.sharing
    _choice(sh.pattern, SHARING_PATTERNS, "model.sharing.pattern")
    _positive(sh.lora_rank, "model.sharing.lora_rank", allow_zero=True)
    _positive(sh.delta_weight_decay, "model.sharing.delta_weight_decay", allow_zero=True)
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


def _validate_moe(m, p, world: int, dtype: str = "fp32") -> None:
    e = m.moe
    _positive(e.num_experts, "model.moe.num_experts", allow_zero=True)
    _positive(p.ep, "parallel.ep")
    if not e.num_experts:
        if p.ep != 1:
            raise ConfigError(f"parallel.ep={p.ep} splits experts over ranks, but model.moe.num_experts=0 (a dense "
                              "model); set model.moe.num_experts or parallel.ep=1")
        return
    _choice(e.router, MOE_ROUTERS, "model.moe.router")
    _choice(e.dispatcher, MOE_DISPATCHERS, "model.moe.dispatcher")
    if not 1 <= e.topk <= e.num_experts:
        raise ConfigError(f"model.moe.topk={e.topk} must be in [1, model.moe.num_experts={e.num_experts}]")
    if not 1 <= e.every <= m.num_layers:
        raise ConfigError(f"model.moe.every={e.every} must be in [1, model.num_layers={m.num_layers}]")
    for key in ("aux_loss_coeff", "z_loss_coeff", "shared_expert_size", "bias_update_rate"):
        _positive(getattr(e, key), f"model.moe.{key}", allow_zero=True)
    if e.ffn_hidden_size is not None:
        _positive(e.ffn_hidden_size, "model.moe.ffn_hidden_size")
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
    dp = world // p.tp if world % p.tp == 0 else None
    if dp is not None and dp % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel size {dp} (world {world} / parallel.tp "
                          f"{p.tp}): each expert-parallel group is ep ranks of one tensor-parallel position")
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


def _validate_sparse(m, d) -> None:
    if m.attention not in SPARSE_ATTENTIONS:
        return
    sp = m.sparse
    bs = sp.block_size
    _choice(bs, BLOCK_SIZES, "model.sparse.block_size")
    if m.seq_length % bs:
        raise ConfigError(f"model.seq_length({m.seq_length}) is not a multiple of model.sparse.block_size({bs}), "
                          f"which model.attention={m.attention} needs")
    for key in ("window", "stride"):
        _positive(getattr(sp, key), f"model.sparse.{key}")
    for key in ("global_blocks", "random_blocks"):
        _positive(getattr(sp, key), f"model.sparse.{key}", allow_zero=True)
    forced = 2 if sp.keep_first else 1  # own block (+ first block): topk must leave room for them
    if sp.topk < forced:
        raise ConfigError(f"model.sparse.topk={sp.topk} must be >= {forced} (model.sparse.keep_first={sp.keep_first})")
    if m.dropout:
        raise ConfigError(f"model.dropout={m.dropout}: model.attention={m.attention} has no attention dropout; "
                          "set model.dropout=0 or use model.attention=dense")


def _validate_virtual_tokens(method: str, n: int, m, p, d) -> None:
    """Prompt and prefix tuning put N positions before the tokens (what they cannot be combined with)."""
    why = None
    if m.position_embedding == "learned_absolute":
        why = ("model.position_embedding=learned_absolute has no positions for the virtual tokens (the positions grow "
               "by finetune.virtual_tokens); use rope or alibi")
    elif method == "prompt" and p.sequence_parallel:
        why = "parallel.sequence_parallel=true splits the sequence the virtual tokens are put in front of"
    elif d.reset_at_eod:
        why = ("data.reset_at_eod=true: the documents after the first of a sample would see the virtual tokens from "
               "further away than the first does (rotary / ALiBi positions)")
    elif method == "prompt" and m.attention not in ("dense", "flash"):
        why = (f"model.attention={m.attention}: the virtual tokens are inputs in front of the sequence, which a "
               "block-sparse layout would hide from later tokens; use model.attention=dense")
    elif method == "prefix" and m.attention not in ("dense", "flash") and n % m.sparse.block_size:
        why = (f"finetune.virtual_tokens={n} with model.attention={m.attention}: the prefix keys are whole key blocks "
               f"every query block visits; use a multiple of model.sparse.block_size={m.sparse.block_size}")
    if why:
        raise ConfigError(f"finetune.method={method}: {why}")


def _validate_finetune(f, c) -> None:
    _choice(f.method, FINETUNE_METHODS, "finetune.method")
    _choice(f.head, FINETUNE_HEADS, "finetune.head")
    _positive(f.num_labels, "finetune.num_labels", allow_zero=True)
    if f.head == "none" and (f.num_labels or f.labels):
        raise ConfigError("finetune.num_labels / finetune.labels apply to finetune.head=classification")
    if f.num_labels and f.labels and f.num_labels != len(f.labels):
        raise ConfigError(f"finetune.num_labels={f.num_labels} but finetune.labels names {len(f.labels)} classes")
    if len(set(f.labels)) != len(f.labels):
        raise ConfigError(f"finetune.labels={list(f.labels)} names a class twice")
    if f.method == "full":
        if f.trainable or f.frozen:
            raise ConfigError(f"finetune.trainable / finetune.frozen select parameters for finetune.method=freeze; "
                              f"finetune.method={f.method} trains every parameter")
        return
    if f.method in ("lora", "prompt", "prefix") and f.frozen:
        raise ConfigError(f"finetune.frozen does not apply to finetune.method={f.method} (everything but the adapters "
                          "is frozen); use finetune.trainable=[regex] to train more parameters beside them")
    if f.method in ("prompt", "prefix"):
        _positive(f.virtual_tokens, "finetune.virtual_tokens")
        _positive(f.prefix_projection, "finetune.prefix_projection", allow_zero=True)
    elif f.method == "lora":
        _positive(f.lora.rank, "finetune.lora.rank")
        _positive(f.lora.alpha, "finetune.lora.alpha")
        if not 0 <= f.lora.dropout < 1:
            raise ConfigError(f"finetune.lora.dropout={f.lora.dropout} must be in [0, 1)")
        bad = [t for t in f.lora.targets if t not in LORA_TARGETS]
        if bad or not f.lora.targets:
            raise ConfigError(f"finetune.lora.targets={list(f.lora.targets)}: choose one or more of {list(LORA_TARGETS)}")
    elif bool(f.trainable) == bool(f.frozen):
        raise ConfigError(f"finetune.method={f.method} needs exactly one of finetune.trainable=[regex, ...] (what "
                          "trains) or finetune.frozen=[regex, ...] (what does not)")
    for key in ("trainable", "frozen"):
        for pattern in getattr(f, key):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"finetune.{key}: {pattern!r} is not a regular expression ({err})") from None
    if c.init_from is None:
        raise ConfigError(f"finetune.method={f.method} adapts a trained model: set checkpoint.init_from=<run or "
                          "checkpoint directory> (its weights are the frozen base)")


def _validate_objectives(objectives, d, f) -> None:
    if not objectives:
        raise ConfigError(f"train.objectives is empty; give at least one of {list(OBJECTIVES)}, e.g. "
                          "'[{name: clm}]'")
    names = [o.name if o.name != "denoise" else f"denoise {o.mode}" for o in objectives]
    for i, o in enumerate(objectives):
        _choice(o.name, OBJECTIVES, f"train.objectives[{i}].name")
        if not (o.weight > 0 and math.isfinite(o.weight)):
            raise ConfigError(f"train.objectives[{i}].weight={o.weight} ({o.name}) must be positive")
        _choice(o.target, CLASSIFY_TARGETS, f"train.objectives[{i}].target")
        if not (o.temperature > 0 and math.isfinite(o.temperature)):
            raise ConfigError(f"train.objectives[{i}].temperature={o.temperature} must be positive")
        _positive(o.projection, f"train.objectives[{i}].projection")
        _choice(o.mode, DENOISE_MODES, f"train.objectives[{i}].mode")
        if not o.mean_span >= 1:
            raise ConfigError(f"train.objectives[{i}].mean_span={o.mean_span} must be >= 1 (tokens)")
        if not 0 < o.rate < 1:
            raise ConfigError(f"train.objectives[{i}].rate={o.rate} must be in (0, 1)")
        kinds = {k: getattr(o, k) for k in ("mask", "replace", "delete")}
        if not all(v >= 0 and math.isfinite(v) for v in kinds.values()) or not sum(kinds.values()) > 0:
            raise ConfigError(f"train.objectives[{i}]: mask={o.mask}, replace={o.replace}, delete={o.delete} are the "
                              "weights of each span's corruption: give non-negative numbers, not all 0")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"train.objectives names {twice[0]} twice; give each objective once with its weight")
    by_source = any(o.name == "classify" and o.target == "source" for o in objectives)
    if by_source and not d.sources:
        raise ConfigError("train.objectives: classify predicts which data.sources entry a sample comes from; give "
                          "two or more data.sources (or target: label, for data prepared with labels)")
    if by_source and len(d.sources) < 2:
        raise ConfigError(f"train.objectives: classify with {len(d.sources)} data.sources has nothing to tell apart; "
                          "give two or more sources")
    if names != ["clm"] and f.head != "none":
        raise ConfigError(f"train.objectives={names} with finetune.head={f.head}: a classification run has its own "
                          "loss; use the default train.objectives")


def _validate_data(d, t) -> None:
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if d.val_fraction == 0 and t.eval_interval:
        raise ConfigError(f"data.val_fraction=0 leaves nothing to evaluate but train.eval_interval={t.eval_interval}; "
                          "set train.eval_interval=0 or a positive data.val_fraction")
    if d.sources and d.path is not None:
        raise ConfigError("data.sources and data.path are both set; give prepared data.sources, or one data.path "
                          "to prepare into run.dir/data")
    for i, src in enumerate(d.sources):
        if not src.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight={src.weight} must be positive")


def resolve(cfg) -> None:
    """Fill derived values (so run.dir/config.yaml holds concrete numbers) and make every path
    absolute against the directory the user launched from."""
    if cfg.train.micro_batch_size is None:
        dp = max(1, data_parallel_size(cfg))
        cfg.train.micro_batch_size = max(1, cfg.train.global_batch_size // dp)
    cfg.run.dir = os.path.abspath(cfg.run.dir)
    if cfg.data.path is not None:
        cfg.data.path = os.path.abspath(cfg.data.path)
    for src in cfg.data.sources:
        src.path = os.path.abspath(src.path)
    if Path(cfg.data.tokenizer).exists():
        cfg.data.tokenizer = os.path.abspath(cfg.data.tokenizer)
    if cfg.checkpoint.resume not in ("auto", "never"):
        cfg.checkpoint.resume = os.path.abspath(cfg.checkpoint.resume)
    hf = hf_dir(cfg.checkpoint.init_from)
    if hf is not None:  # a transformers model: its architecture becomes ours (hf_import.py)
        cfg.checkpoint.init_from = f"{HF_PREFIX}{os.path.abspath(hf)}"
        hf_config = read_config(Path(os.path.abspath(hf)))
        fields = model_fields(hf_config, str(hf))
        limit = max_positions(hf_config)
        if limit is not None and cfg.model.seq_length > limit:
            raise ConfigError(f"model.seq_length={cfg.model.seq_length}: hf:{hf} has learned positions for {limit} "
                              "tokens; set model.seq_length <= that")
        cfg.model = OmegaConf.merge(cfg.model, {"name": f"hf:{Path(hf).name}", **fields})
    elif cfg.checkpoint.init_from is not None:
        cfg.checkpoint.init_from = os.path.abspath(cfg.checkpoint.init_from)
    if cfg.run.name is None:
        cfg.run.name = os.path.basename(cfg.run.dir)


def save_run_config(cfg, run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, OmegaConf.to_yaml(cfg))
    return path


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved config a launcher wrote, checked against the schema, validated, as typed objects."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.yaml; start runs with `python -m launcher run.dir={run_dir}`")
    return parse_run_config(path.read_text(), str(path))


def parse_run_config(text: str, where: str) -> Config:
    """A resolved config's YAML (run.dir/config.yaml, a checkpoint's, a consolidated file's metadata),
    checked against the schema (an unknown key or a wrong type is an error), validated, and returned as
    the schema's dataclasses: code past this point holds plain typed objects (cfg.model is a ModelConfig),
    never an OmegaConf node."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.create(text)
        if "vocab_size" in raw.get("model", {}):  # written by runs before the vocabulary came from the tokenizer
            del raw.model["vocab_size"]
        if "eval_batches" in raw.get("train", {}):  # written by runs before evaluation counted samples
            del raw.train["eval_batches"]
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except (OmegaConfBaseException, ValueError) as err:  # a hand-edited file: unknown key, wrong type, bad YAML
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None
    validate(cfg)
    return OmegaConf.to_object(cfg)
