"""Export to Hugging Face transformers: `python -m gorilla_dist.export run.dir=... out=<dir>`.

Writes a directory `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`
load as they are: config.json, model.safetensors, generation_config.json and the tokenizer files. The
source is a run's checkpoint (any training layout; `checkpoint=latest|<dir>`) or a file written by
`python -m gorilla_dist.checkpoint consolidate` (`consolidated=<file>`, which carries the config and
tokenizer in its metadata).

Our model is megatron-core's pre-norm GPT; each supported combination maps exactly onto one
transformers architecture (same maths, parameters renamed and re-laid-out, vocabulary padding dropped):

    rope             + RMSNorm   + swiglu  -> LlamaForCausalLM   (grouped-query attention too)
    rope             + LayerNorm + gelu    -> GPTNeoXForCausalLM (sequential residual, full rotary)
    learned_absolute + LayerNorm + gelu    -> GPT2LMHeadModel
    rope + RMSNorm + swiglu, model.moe (softmax top-k >= 2, every layer, no shared expert, dropless,
                                          no biases)   -> MixtralForCausalLM
    the same with a sigmoid-gated shared expert (any top-k, any model.moe.every) -> Qwen2MoeForCausalLM

A run with a classification head (finetune.head=classification) exports as the same architecture's
*ForSequenceClassification (LlamaForSequenceClassification, GPT2ForSequenceClassification, ...): the
head becomes its `score`, the class names its id2label, and pad_token_id is <eod>, so transformers
scores the last token before any trailing <eod>: the token our head reads.

Anything else (ALiBi, block-sparse attention, ...) has no transformers architecture computing the same
function, and is refused rather than exported approximately. transformers itself is not needed to
export, only to load the result.

Fine-tuned runs: `format=merged` (the default) writes the plain model, LoRA adapters folded into the
weights (W + alpha/r B A) and frozen parameters taken from the base checkpoint. `format=peft` writes a
LoRA run's adapters as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for
`PeftModel.from_pretrained(<the base run exported>, out)`: megatron's fused linears become transformers'
modules by splitting B's rows as the weight's (Llama's q/k/v and gate/up), A being shared. A prompt-tuning
run's virtual tokens export the same way, as PEFT's PROMPT_TUNING `prompt_embeddings`, and a prefix-tuning
run's keys and values (computed through its MLP, if any) as PREFIX_TUNING's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gorilla_dist.dtypes import TORCH_DTYPES as DTYPES
from gorilla_dist.errors import UserError
from gorilla_dist.hf import adapters, split_qkv

EOD_TOKEN = "<|endoftext|>"  # the name char/byte tokenizers' end-of-document id gets in transformers
SUPPORTED = ("rope + RMSNorm + swiglu (Llama; with model.moe: Mixtral), rope + LayerNorm + gelu (GPT-NeoX), "
             "learned_absolute + LayerNorm + gelu (GPT-2)")


class ExportError(UserError):
    pass


def architecture(m) -> str:
    """The transformers model_type computing exactly what our model `m` (a ModelConfig) computes."""
    from gorilla_dist.kernels.registry import attention_kernel

    kernel = attention_kernel(m.attention)
    if not kernel.supports.hf_twin:
        what = "block-sparse attention" if kernel.supports.blocks else "such attention (the kernel declares no hf_twin)"
        raise ExportError(f"model.attention={m.attention}: transformers has no {what}, so the exported model would "
                          "compute something else; only dense attention exports")
    mha = m.num_query_groups in (None, m.num_heads)
    combo = (m.position_embedding, m.normalization, m.activation)
    if m.moe.num_experts:
        return _moe_architecture(m, combo)
    if combo == ("rope", "RMSNorm", "swiglu"):
        return "llama"
    if combo in (("rope", "LayerNorm", "gelu"), ("learned_absolute", "LayerNorm", "gelu")):
        arch = "gpt_neox" if m.position_embedding == "rope" else "gpt2"
        if not mha:
            raise ExportError(f"model.num_query_groups={m.num_query_groups}: {arch} has no grouped-query "
                              "attention (use RMSNorm + swiglu, which exports as Llama)")
        return arch
    raise ExportError(f"model.position_embedding={m.position_embedding}, model.normalization={m.normalization}, "
                      f"model.activation={m.activation}: no transformers architecture computes this model exactly; "
                      f"exportable: {SUPPORTED}")


def _moe_architecture(m, combo) -> str:
    """Mixtral: Llama's attention and norms, every MLP a softmax top-k (k >= 2, renormalised) mixture of
    SwiGLU experts without biases, dropless. Qwen2-MoE: the same with a sigmoid-gated shared expert, any
    top-k (top-1 keeps the softmax probability, k >= 2 renormalises: its norm_topk_prob), dense MLPs
    wherever model.moe.every puts them. Anything else would compute something else."""
    e = m.moe
    if e.shared_expert_size:
        why = [reason for bad, reason in [
            (combo != ("rope", "RMSNorm", "swiglu"), "rope + RMSNorm + swiglu"),
            (m.bias, "no biases (model.bias=false)"),
            (e.router != "softmax", "a softmax router"),
            (not e.shared_expert_gate, "a sigmoid gate on the shared expert (model.moe.shared_expert_gate=true)"),
            (e.capacity_factor is not None, "dropless routing (model.moe.capacity_factor=null)"),
        ] if bad]
        if why:
            raise ExportError("model.moe with a shared expert: transformers' Qwen2-MoE is the architecture we export "
                              f"it to, and it needs {'; '.join(why)}; no transformers architecture computes this model "
                              "exactly")
        return "qwen2_moe"
    why = [reason for bad, reason in [
        (combo != ("rope", "RMSNorm", "swiglu"), "rope + RMSNorm + swiglu"),
        (m.bias, "no biases (model.bias=false)"),
        (e.router != "softmax" or e.topk < 2, "a softmax router choosing topk >= 2 experts (renormalised)"),
        (e.every != 1, "experts in every layer (model.moe.every=1)"),
        (e.shared_expert_size != 0, "no shared expert"),
        (e.capacity_factor is not None, "dropless routing (model.moe.capacity_factor=null)"),
    ] if bad]
    if why:
        raise ExportError("model.moe: transformers' Mixtral is the mixture-of-experts architecture we export to, and it "
                          f"needs {'; '.join(why)}; no transformers architecture computes this model exactly")
    return "mixtral"


def hf_config(m, arch: str, *, vocab_size: int, eod: int, dtype: str) -> dict:
    """config.json of architecture `arch` for our model config `m` (its adapter, gorilla_dist/hf/)."""
    return adapters()[arch].config(m, vocab_size=vocab_size, eod=eod, dtype=dtype)


def hf_weights(m, arch: str, w: dict[str, torch.Tensor], *, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our consolidated (TP=1, megatron-core names) weights -> the transformers architecture's names."""
    return adapters()[arch].to_hf(m, w, vocab_size=vocab_size)


def classification_config(config: dict, labels: list[str], eod: int) -> dict:
    """A causal-LM config.json turned into its *ForSequenceClassification's (transformers' names)."""
    causal = config["architectures"][0]
    arch = causal.replace("LMHeadModel", "ForSequenceClassification").replace("ForCausalLM", "ForSequenceClassification")
    return {**config, "architectures": [arch], "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": eod,
            "tie_word_embeddings": False}


def hf_tokenizer(tok) -> tuple[str, str]:
    """(tokenizer.json text, end-of-document token) for transformers' PreTrainedTokenizerFast; encodes
    every text to the same ids as our tokenizer. The end-of-document id of char/byte tokenizers becomes
    the special token <|endoftext|> (which is how transformers decodes it; ours decodes it as a newline)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if tok.kind == "hf":
        return json.dumps(tok.to_json()["hf"], ensure_ascii=False), tok.eod_token
    if tok.kind == "char":
        vocab = {c: i for i, c in enumerate(tok.chars)}
        t = Tokenizer(models.WordLevel(vocab, unk_token=None))
        t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
        t.decoder = decoders.Fuse()  # characters back to back, no spaces between them
    else:  # byte: the 256 byte values under GPT-2's printable byte alphabet, ids = byte values, no merges
        from gorilla_dist.data.tokenizer import bytes_to_unicode

        t = Tokenizer(models.BPE({c: b for b, c in bytes_to_unicode().items()}, [], byte_fallback=False))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        t.decoder = decoders.ByteLevel()
    # <eod>, then the objectives' special tokens (data/tokenizer.py), at the ids they have here
    t.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in (EOD_TOKEN, *tok.specials)])
    for name, want in ((EOD_TOKEN, tok.eod), *((n, tok.special_id(n)) for n in tok.specials)):
        if t.token_to_id(name) != want:
            raise ExportError(f"tokenizer: {name} got id {t.token_to_id(name)}, expected {want}")
    return t.to_str(), EOD_TOKEN


@dataclass
class ExportArgs:
    run_dir: str | None = None
    """The training run's directory (run.dir=...); or give consolidated=."""
    consolidated: str | None = None
    """A file written by `python -m gorilla_dist.checkpoint consolidate` (instead of run.dir=)."""
    out: str | None = None
    """The directory to write; it must not exist yet."""
    checkpoint: str = "latest"
    """With run.dir: latest (newest usable checkpoint) or a checkpoint directory."""
    dtype: str = "fp32"
    """fp32 | bf16 | fp16 (the checkpoint holds fp32 master weights)."""
    format: str = "merged"
    """merged (a transformers model; fine-tuned adapters folded in) | peft (a LoRA run's adapters as a
    PEFT adapter directory, for the base run exported with format=merged)."""


EXPORT_FORMATS = ("merged", "peft")
def peft_adapter(m, arch: str, weights: dict[str, torch.Tensor], lora) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA run's adapter tensors (our names) -> (PEFT's adapter_model tensors, adapter_config.json)."""
    adapter = adapters()[arch]
    if not adapter.peft:
        raise ExportError(f"format=peft: {arch} models are not supported (PEFT adapters are written for "
                          f"{sorted(a for a, x in adapters().items() if x.peft)}); use format=merged")
    nh, ng = m.num_heads, m.num_query_groups or m.num_heads
    out, targets = {}, set()
    for name, a in weights.items():
        if not name.endswith(".lora_A"):
            continue
        linear = name[:-len(".lora_A")]
        layer, path = linear.split(".", 3)[2], linear.split(".", 3)[3]
        b = weights[linear + ".lora_B"]
        modules = adapter.peft[path]
        if len(modules) == 3:  # B's rows are the fused QKV's
            parts = list(split_qkv(b, nh, ng))
        elif len(modules) == 2:  # gated fc1: [gate; up]
            parts = list(b.chunk(2, dim=0))
        else:
            parts = [b]
        for module, part in zip(modules, parts):
            key = f"base_model.model.{adapter.layers}.{layer}.{module}"
            out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = a.clone(), part.contiguous().clone()
            targets.add(module.rsplit(".", 1)[1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": sorted(targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None, "base_model_name_or_path": None,
              "inference_mode": True}
    return out, config


def export_peft(args) -> tuple[str, Path, str, int]:
    """format=peft: the adapters of run.dir's LoRA checkpoint as a PEFT adapter directory."""
    from safetensors.torch import save_file

    from gorilla_dist.checkpoint import own_weights, resolve_checkpoint
    from gorilla_dist.config import load_run_config
    from gorilla_dist.files import write_text_atomic
    from gorilla_dist.finetune import is_adapter

    if not args.run_dir:
        raise ExportError("format=peft exports a LoRA run's adapters: give run.dir=<the fine-tuning run>")
    ckpt = resolve_checkpoint(args.run_dir, args.checkpoint)
    cfg = load_run_config(ckpt)
    method = cfg.finetune.method
    if method not in ("lora", "prompt", "prefix"):
        raise ExportError(f"format=peft writes LoRA, prompt- and prefix-tuning adapters; {args.run_dir} was trained "
                          f"with finetune.method={method}; use format=merged")
    if cfg.finetune.head != "none":
        raise ExportError(f"format=peft: {args.run_dir} has a classification head, which this export does not write "
                          "into a PEFT adapter; use format=merged (a transformers *ForSequenceClassification)")
    weights = own_weights(ckpt)  # the adapter checkpoint: its trainable parameters only
    other = sorted(k for k in weights if not is_adapter(k))
    if other:
        raise ExportError(f"format=peft: the run also trained {other[:3]} (finetune.trainable), which a PEFT adapter "
                          "does not hold; use format=merged")
    arch = architecture(cfg.model)
    m = cfg.model
    if method == "lora":
        tensors, config = peft_adapter(m, arch, weights, cfg.finetune.lora)
    elif method == "prefix":
        from gorilla_dist.model.prefix import full_prefix

        groups, head_dim = m.num_query_groups or m.num_heads, m.hidden_size // m.num_heads
        n = cfg.finetune.virtual_tokens
        kv = full_prefix(weights, (n, m.num_layers, 2, groups, head_dim))
        # PEFT's layout: per virtual token, (layers * 2, key/value heads, head_dim), key before value
        tensors = {"prompt_embeddings": kv.reshape(n, -1).contiguous()}
        config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
                  "token_dim": groups * head_dim, "num_attention_heads": groups, "num_layers": m.num_layers,
                  "num_transformer_submodules": 1, "encoder_hidden_size": groups * head_dim, "prefix_projection": False,
                  "inference_mode": True}
    else:
        tensors = {"prompt_embeddings": weights["soft_prompt.weight"].clone()}
        config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                  "num_virtual_tokens": cfg.finetune.virtual_tokens, "token_dim": m.hidden_size,
                  "num_transformer_submodules": 1, "num_attention_heads": m.num_heads, "num_layers": m.num_layers,
                  "prompt_tuning_init": "RANDOM", "inference_mode": True}
    config["base_model_name_or_path"] = json.loads((ckpt / "base.json").read_text())["path"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.to(DTYPES[args.dtype]) for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    write_text_atomic(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out)
    what = f"LoRA adapter ({', '.join(config['target_modules'])})" if method == "lora" else f"{method}-tuning adapter"
    return str(ckpt), out, f"PEFT {what}", sum(v.numel() for v in tensors.values())


def load_source(args):
    """(the run's Config, tokenizer, fp32 weights, where they came from) from run.dir= or consolidated=."""
    from safetensors import safe_open

    from gorilla_dist.checkpoint import checkpoint_weights, resolve_checkpoint
    from gorilla_dist.config import load_run_config, parse_run_config
    from gorilla_dist.data.tokenizer import load_tokenizer, tokenizer_from_json

    if bool(args.run_dir) == bool(args.consolidated):
        raise ExportError("usage: python -m gorilla_dist.export (run.dir=<run> [checkpoint=latest|<dir>] | "
                          "consolidated=<file.safetensors>) out=<dir> [dtype=fp32|bf16|fp16]")
    if args.run_dir:
        ckpt = resolve_checkpoint(args.run_dir, args.checkpoint)
        cfg = load_run_config(ckpt)
        tok = load_tokenizer(Path(args.run_dir) / "tokenizer.json")
        return cfg, tok, _merged_adapters(cfg, {k: v.float() for k, v in checkpoint_weights(ckpt).items()}), str(ckpt)
    else:
        path = source = Path(args.consolidated)
        if not path.is_file():
            raise ExportError(f"consolidated={path}: no such file")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on a bad header
            raise ExportError(f"consolidated={path}: not a safetensors file ({err})") from None
        if meta.get("format") != "gorilla_dist" or "tokenizer" not in meta:
            raise ExportError(f"consolidated={path}: not written by `python -m gorilla_dist.checkpoint consolidate` "
                              "(no config/tokenizer in its metadata); export from run.dir= instead")
        cfg = parse_run_config(meta["config"], f"consolidated={path} (its config)")
        tok = tokenizer_from_json(json.loads(meta["tokenizer"]), source=str(path))
    from safetensors.torch import load_file

    weights = {k: v.float() for k, v in load_file(str(path)).items()}
    return cfg, tok, _merged_adapters(cfg, weights), source


def _merged_adapters(cfg, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA run's weights with its adapters folded in (W + alpha / r B A): the plain model."""
    if cfg.finetune.method != "lora":
        return weights
    from gorilla_dist.model.deltas import merged

    return merged(weights, "lora", cfg.finetune.lora.alpha / cfg.finetune.lora.rank)


def export(args) -> tuple[str, Path, str, int]:
    """Returns (source, out directory, architecture, parameter count)."""
    if not args.out:
        raise ExportError("out=<directory> is required")
    if args.dtype not in DTYPES:
        raise ExportError(f"dtype={args.dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
    if Path(args.out).exists():
        raise ExportError(f"out={args.out} already exists; not overwriting it (remove it or choose another out=)")
    if args.format not in EXPORT_FORMATS:
        raise ExportError(f"format={args.format!r} is not valid; choose one of: {', '.join(EXPORT_FORMATS)}")
    if args.format == "peft":
        return export_peft(args)
    cfg, tok, weights, source = load_source(args)
    aux = sorted({k.split(".")[1] for k in weights if k.startswith("objective_heads.")})
    if aux:  # (hf_weights maps the model's own parameters only)
        print(f"[export] leaving out the auxiliary head(s) of train.objectives: {', '.join(aux)} (used in "
              "pretraining only; transformers' model has no place for them)", file=sys.stderr)
    arch, n = write_hf(Path(args.out), cfg.model, tok, weights, dtype=args.dtype, labels=cfg.finetune.labels)
    return source, Path(args.out), arch, n


def unrolled(m, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of the plain num_layers-layer model that a model with shared layers (model.sharing)
    computes: each layer takes its weight set's tensors, which a checkpoint stores once, under the first
    layer using the set (per-layer norms, with share_norms=false, and per-layer deltas are stored for every
    layer; a layer's delta is added to its copy of the shared weight)."""
    from gorilla_dist.config import layer_weight_sets
    from gorilla_dist.model.deltas import merged  # (gorilla_dist.model imports megatron-core)

    sets = layer_weight_sets(m.num_layers, m.sharing.unique_layers, m.sharing.pattern)
    out = dict(weights)
    for i, j in enumerate(sets):
        first = sets.index(j)
        if first == i:
            continue
        source, target = f"decoder.layers.{first}.", f"decoder.layers.{i}."
        for name, tensor in weights.items():
            if name.startswith(source):
                out.setdefault(target + name[len(source):], tensor)
    return merged(out)  # per-layer deltas (model.sharing.lora_rank) folded into each layer's weights


def write_hf(out: Path, m, tok, weights: dict[str, torch.Tensor], *, dtype: str = "fp32",
             labels: list[str] | None = None) -> tuple[str, int]:
    """Write the transformers directory `out` (atomically: all of it or nothing) for our model config `m`,
    tokenizer `tok` and consolidated weights (with `classifier.weight`: a sequence classifier of the
    classes `labels`). Returns (architecture, parameter count)."""
    from safetensors.torch import save_file

    from gorilla_dist.files import write_text_atomic

    arch = architecture(m)
    vocab = tok.vocab_size
    tensors = {k: v.to(DTYPES[dtype]).contiguous().clone()
               for k, v in hf_weights(m, arch, unrolled(m, weights), vocab_size=vocab).items()}
    tok_json, eod_token = hf_tokenizer(tok)
    config = hf_config(m, arch, vocab_size=vocab, eod=tok.eod, dtype=dtype)
    if "classifier.weight" in weights:
        config = classification_config(config, list(labels or []), tok.eod)
        arch = config["architectures"][0]
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": tok.eod, "eos_token_id": tok.eod, "pad_token_id": tok.eod},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token,
                                  "bos_token": eod_token, "pad_token": eod_token, "model_max_length": m.seq_length,
                                  "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": {"eos_token": eod_token, "bos_token": eod_token, "pad_token": eod_token},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # a previous export cut off half-way
    tmp.mkdir()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name, content in files.items():
        write_text_atomic(tmp / name, json.dumps(content, indent=2) + "\n")
    write_text_atomic(tmp / "tokenizer.json", tok_json)
    os.replace(tmp, out)
    return arch, sum(v.numel() for v in tensors.values())


def main(argv: list[str]) -> int:
    from gorilla_dist.cli import parse_key_values, run_tool

    def body() -> int:
        args = parse_key_values(argv, ExportArgs, aliases={"run.dir": "run_dir"})
        source, out, arch, n = export(args)
        print(f"[export] {out}: {arch} with {n:,} parameters ({args.dtype}) from {source}", flush=True)
        return 0

    return run_tool(body)


if __name__ == "__main__":
    from gorilla_dist.engine.startup import exit_now

    exit_now(main(sys.argv[1:]))  # skips the interpreter's slow finalization (engine/startup.exit_now)
