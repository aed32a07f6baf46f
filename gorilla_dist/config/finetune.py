"""finetune: adapting a trained model (methods, LoRA, virtual tokens, heads) and its checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError
from gorilla_dist.kernels.registry import attention_kernel, missing

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


def _validate_virtual_tokens(method: str, n: int, m, p, d) -> None:
    """Prompt and prefix tuning put N positions before the tokens (what they cannot be combined with)."""
    kernel, why = attention_kernel(m.attention), None
    if m.position_embedding == "learned_absolute":
        why = ("model.position_embedding=learned_absolute has no positions for the virtual tokens (the positions grow "
               "by finetune.virtual_tokens); use rope or alibi")
    elif method == "prompt" and p.sequence_parallel:
        why = "parallel.sequence_parallel=true splits the sequence the virtual tokens are put in front of"
    elif d.reset_at_eod:
        why = ("data.reset_at_eod=true: the documents after the first of a sample would see the virtual tokens from "
               "further away than the first does (rotary / ALiBi positions)")
    elif method == "prompt" and not kernel.supports.prompt_tuning:
        why = (f"model.attention={m.attention}: the virtual tokens are inputs in front of the sequence, which a "
               "block-sparse layout would hide from later tokens; use model.attention=dense")
    elif method == "prefix" and not kernel.supports.prefix_tuning:
        why = f"{missing(kernel, 'prefix_tuning', m)}; use model.attention=dense"
    elif method == "prefix" and kernel.supports.blocks and n % m.sparse.block_size:
        why = (f"finetune.virtual_tokens={n} with model.attention={m.attention}: the prefix keys are whole key blocks "
               f"every query block visits; use a multiple of model.sparse.block_size={m.sparse.block_size}")
    if why:
        raise ConfigError(f"finetune.method={method}: {why}")


def _validate_finetune(f, c) -> None:
    choice(f.method, FINETUNE_METHODS, "finetune.method")
    choice(f.head, FINETUNE_HEADS, "finetune.head")
    positive(f.num_labels, "finetune.num_labels", allow_zero=True)
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
        positive(f.virtual_tokens, "finetune.virtual_tokens")
        positive(f.prefix_projection, "finetune.prefix_projection", allow_zero=True)
    elif f.method == "lora":
        positive(f.lora.rank, "finetune.lora.rank")
        positive(f.lora.alpha, "finetune.lora.alpha")
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


def check_finetune(f, c, m, p, d) -> None:
    """finetune (c, m, p, d: the checkpoint, model, parallel and data sections it must fit)."""
    _validate_finetune(f, c)
    if f.method in ("prompt", "prefix"):
        _validate_virtual_tokens(f.method, f.virtual_tokens, m, p, d)
    if f.method == "lora" and m.sharing.unique_layers not in (None, m.num_layers):
        raise ConfigError(f"finetune.method=lora with model.sharing.unique_layers={m.sharing.unique_layers}: adapters on "
                          "shared layers are not built (export would have to unroll the layers first); use "
                          "finetune.method=freeze or full")
