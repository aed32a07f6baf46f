"""Fine-tuning methods, applied to the built model before the engine is built, so DeepSpeed sees only
the trainable parameters: a frozen one (requires_grad False) is in no optimizer group, has no gradient,
no fp32 master and no optimizer state at any ZeRO stage (ZeRO-3 still partitions its weight).

    full    every parameter trains (the default; checkpoints hold the whole model)
    freeze  finetune.trainable / finetune.frozen select parameters by regular expressions searched in
            their single-process names; checkpoints hold the trainable ones only (checkpoint/)
    prompt  N virtual tokens (model/prompts.py) before every sample; they train, the rest is frozen;
            initialised from base embedding rows (random tokens, or finetune.init_text's)
    prefix  N learned keys and values per layer (model/prefix.py), directly or through an MLP
    lora    low-rank adapters `<linear>.lora_A` / `.lora_B` on the targeted linears of every layer
            (model/deltas.py: tensor- and sequence-parallel like the linear); they train, the rest is frozen
            (but what finetune.trainable names); checkpoints hold them; export merges W + alpha/r B A

With finetune.head=classification (model/head.py) the model scores classes instead of tokens; the head
(`classifier.weight`) trains under every method, the unused output layer never does.

The adapters are modules of the model: model.build_model(..., finetune=) adds them, wherever a model of
the run is built (training, generate, evaluate), so the modules match the checkpoints. `apply_finetune`
then sets which parameters train, before the engine is built.
"""

from __future__ import annotations

import re

import torch

from gorilla_dist.config import FinetuneConfig
from gorilla_dist.engine.state import expert_names, full_shape, is_stage_copy, model_shapes
from gorilla_dist.errors import ConfigError
from gorilla_dist.model.head import HEAD, is_classifier
from gorilla_dist.model.prefix import PREFIX
from gorilla_dist.model.prompts import PROMPT


def adapter_checkpoints(f: FinetuneConfig) -> bool:
    """Checkpoints hold the trainable parameters only, beside the identity of the base checkpoint."""
    return f.method != "full"


LORA = "lora"


def is_adapter(name: str) -> bool:
    """A parameter that fine-tuning adds to the base model (absent from the base checkpoint)."""
    return name.endswith((f".{LORA}_A", f".{LORA}_B")) or name.startswith((f"{PROMPT}.", f"{PREFIX}.", f"{HEAD}."))


def resolve_labels(f: FinetuneConfig, label_names: list[str] | None) -> None:
    """head=classification: fill finetune.num_labels and finetune.labels from the data's classes (so the
    run's checkpoints record them), or refuse data that does not have the classes the config names."""
    from gorilla_dist.objectives.classify import resolve_classes

    if f.head != "classification":
        return
    label_names = resolve_classes("finetune.labels", f.labels, label_names, needs="finetune.head=classification")
    if f.num_labels and f.num_labels != len(label_names):
        raise ConfigError(f"finetune.num_labels={f.num_labels} but the data has {len(label_names)} classes: "
                          f"{label_names}; leave finetune.num_labels=0 to take the data's")
    f.labels, f.num_labels = list(label_names), len(label_names)


def check_finetune_data(f: FinetuneConfig, d, datasets) -> None:
    """Prompt and prefix tuning need one instruction example per sample: in a packed sample the examples
    after the first would sit further from the virtual tokens than at inference (rotary / ALiBi)."""
    if f.method in ("prompt", "prefix") and d.pack and any(ds.examples for ds in datasets):
        raise ConfigError(f"finetune.method={f.method} with packed instruction examples: the examples after the first "
                          "of a sample would see the virtual tokens from further away than the first (rotary / ALiBi "
                          "positions), unlike at inference; set data.pack=false (one example per sample)")


def prompt_init(f: FinetuneConfig, tokenizer, seed: int):
    """method=prompt: a function of the base weights (a safetensors handle) giving the virtual tokens'
    first values, the base's embedding rows of N token ids: finetune.init_text's tokens repeated to N,
    or N random ids of the vocabulary (seeded). None for the other methods."""
    if f.method != "prompt":
        return None
    n = f.virtual_tokens
    if f.init_text:
        ids = torch.as_tensor(tokenizer.encode(f.init_text), dtype=torch.long)
        if not len(ids):
            raise ConfigError(f"finetune.init_text={f.init_text!r} has no tokens")
        ids = ids.repeat(-(-n // len(ids)))[:n]
    else:
        ids = torch.randint(0, tokenizer.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))

    def values(weights) -> dict[str, torch.Tensor]:
        return {f"{PROMPT}.weight": weights.get_tensor("embedding.word_embeddings.weight")[ids].clone()}

    return values


def lora_scale(f: FinetuneConfig) -> float:
    return f.lora.alpha / f.lora.rank


def apply_finetune(model: torch.nn.Module, f: FinetuneConfig) -> str | None:
    """Freeze what `f` says (a model built with build_model(..., finetune=f)); returns a one-line summary
    (None for method=full)."""
    head = is_classifier(model)  # (on every pipeline stage; the head itself is on the last)
    for name, p in model.named_parameters():
        if head and name.startswith("output_layer."):  # not used by a classifier (an untied output layer)
            p.requires_grad_(False)
    if f.method == "full":
        return f"full, classification head of {model.num_labels} classes: " + _summary(model) if head else None
    adapters = f"{f.method}: " + (f"a classification head of {model.num_labels} classes; " if head else "")
    if f.method in ("lora", "prompt", "prefix"):
        done = sum(name.endswith(f".{LORA}_A") for name, _ in model.named_parameters())
        adapters += (f"rank {f.lora.rank} adapters on {done} linears; " if f.method == "lora" else
                     f"{f.virtual_tokens} virtual tokens; " if f.method == "prompt" else
                     f"{f.virtual_tokens} keys and values per layer"
                     f"{f' through an MLP of width {f.prefix_projection}' if f.prefix_projection else ''}; ")
        for name, p in model.named_parameters():
            p.requires_grad_(is_adapter(name))
        if not f.trainable:  # (else also what finetune.trainable names, below)
            return adapters + _summary(model)
    key, patterns = ("trainable", f.trainable) if f.trainable else ("frozen", f.frozen)
    regexes = [re.compile(p) for p in patterns]
    params = list(model.named_parameters())
    names = {name: expert_names(model, name, p) for name, p in params}  # all EP ranks' names (experts)
    every = list(model_shapes(model))  # every pipeline stage's names too (a collective with stages)
    for pattern, regex in zip(patterns, regexes):
        if not any(regex.search(n) for n in every):
            raise ConfigError(f"finetune.{key}: {pattern!r} matches no parameter; names look like "
                              f"{every[:2] + every[-2:]} ({len(every)} in all)")
    for name, p in params:
        hits = {any(r.search(n) for r in regexes) for n in names[name]}
        if len(hits) > 1:
            raise ConfigError(f"finetune.{key} selects some of the experts that {name} holds on different "
                              "expert-parallel ranks but not others; select all experts of a layer or none, or use "
                              "parallel.ep=1")
        hit = hits.pop()
        if f.method in ("lora", "prompt", "prefix"):
            p.requires_grad_(p.requires_grad or hit)
        else:
            p.requires_grad_(name.startswith(f"{HEAD}.") or (hit if key == "trainable" else not hit))
    if not any(p.requires_grad for _, p in params):
        stage = getattr(getattr(model, "config", None), "pipeline_model_parallel_size", 1) > 1
        raise ConfigError(f"finetune.{key}={list(patterns)} leaves no parameter to train"
                          + (" on this pipeline stage (each stage needs one; change the patterns or "
                             "parallel.pp_layers)" if stage else ""))
    return adapters + _summary(model)


def _summary(model: torch.nn.Module) -> str:
    """'n of m tensors train, ...' for the whole model: with pipeline stages, summed over them (a collective;
    the last stage's copy of tied embeddings counted once)."""
    from gorilla_dist.parallel import over_stages

    trained = total = n_train = n = 0
    for name, p in model.named_parameters():
        if is_stage_copy(p):
            continue
        count = len(expert_names(model, name, p)) * int(torch.Size(full_shape(model, name, p)).numel())
        total, n = total + count, n + 1
        trained, n_train = trained + (count if p.requires_grad else 0), n_train + int(p.requires_grad)
    n_train, n, trained, total = (sum(column) for column in zip(*over_stages([n_train, n, trained, total])))
    return f"{n_train} of {n} tensors train, {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"
