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

from gorilla_dist.config import moe_layers
from gorilla_dist.dtypes import TORCH_DTYPES as DTYPES
from gorilla_dist.errors import UserError

TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
EOD_TOKEN = "<|endoftext|>"  # the name char/byte tokenizers' end-of-document id gets in transformers
SUPPORTED = ("rope + RMSNorm + swiglu (Llama; with model.moe: Mixtral), rope + LayerNorm + gelu (GPT-NeoX), "
             "learned_absolute + LayerNorm + gelu (GPT-2)")


class ExportError(UserError):
    pass


def architecture(m) -> str:
    """The transformers model_type computing exactly what our model `m` (a ModelConfig) computes."""
    if m.attention not in ("dense", "flash"):
        raise ExportError(f"model.attention={m.attention}: transformers has no block-sparse attention, so the "
                          "exported model would compute something else; only dense attention exports")
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
    h, nh = m.hidden_size, m.num_heads
    common = {"vocab_size": vocab_size, "tie_word_embeddings": bool(m.tie_embeddings), "eos_token_id": eod,
              "bos_token_id": eod, "torch_dtype": TORCH_DTYPE_NAMES[dtype], "use_cache": True}
    ffn = m.ffn_hidden_size or 4 * h
    if arch == "qwen2_moe":
        e = m.moe
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": h,
                "intermediate_size": ffn, "moe_intermediate_size": e.ffn_hidden_size or ffn,
                "shared_expert_intermediate_size": e.shared_expert_size, "num_hidden_layers": m.num_layers,
                "num_attention_heads": nh, "num_key_value_heads": m.num_query_groups or nh, "hidden_act": "silu",
                "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_eps, "rope_theta": float(m.rotary_base),
                "use_sliding_window": False, "attention_dropout": 0.0, "qkv_bias": False,
                "num_experts": e.num_experts, "num_experts_per_tok": e.topk, "norm_topk_prob": e.topk > 1,
                "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(m.num_layers) if i not in moe_layers(m)],
                "output_router_logits": False, "router_aux_loss_coef": e.aux_loss_coeff, **common}
    if arch == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": h,
                "intermediate_size": m.moe.ffn_hidden_size or ffn, "num_hidden_layers": m.num_layers,
                "num_attention_heads": nh, "num_key_value_heads": m.num_query_groups or nh, "head_dim": h // nh,
                "hidden_act": "silu", "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_eps,
                "rope_theta": float(m.rotary_base), "sliding_window": None, "attention_dropout": 0.0,
                "num_local_experts": m.moe.num_experts, "num_experts_per_tok": m.moe.topk,
                "output_router_logits": False, "router_aux_loss_coef": m.moe.aux_loss_coeff,
                "router_jitter_noise": 0.0, **common}
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
                "intermediate_size": ffn, "num_hidden_layers": m.num_layers, "num_attention_heads": nh,
                "num_key_value_heads": m.num_query_groups or nh, "head_dim": h // nh, "hidden_act": "silu",
                "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_eps, "rope_theta": float(m.rotary_base),
                "rope_scaling": None, "attention_bias": bool(m.bias), "mlp_bias": bool(m.bias),
                "attention_dropout": 0.0, **common}
    if arch == "gpt_neox":
        # Biases always present in GPT-NeoX's linears: a model trained without them exports zeros.
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": h,
                "intermediate_size": ffn, "num_hidden_layers": m.num_layers, "num_attention_heads": nh,
                "hidden_act": "gelu", "rotary_pct": 1.0, "rotary_emb_base": m.rotary_base,
                "rope_theta": float(m.rotary_base), "max_position_embeddings": m.seq_length,
                "layer_norm_eps": m.norm_eps, "use_parallel_residual": False, "attention_bias": True,
                "attention_dropout": 0.0, "hidden_dropout": 0.0, **common}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": h, "n_inner": ffn,
            "n_layer": m.num_layers, "n_head": nh, "n_positions": m.seq_length, "activation_function": "gelu",
            "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, **common}


def split_qkv(t: torch.Tensor, nh: int, ng: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV rows (per query group: its nh/ng query heads, then one key and one value
    head) -> the q, k, v rows of `t` (a weight, bias or LoRA B), each head's rows in order."""
    hd = t.shape[0] // (nh + 2 * ng)
    t = t.reshape(ng, nh // ng + 2, hd, *t.shape[1:])
    q, k, v = t[:, :-2], t[:, -2], t[:, -1]
    return tuple(x.reshape(-1, *t.shape[3:]) for x in (q, k, v))


def hf_weights(m, arch: str, w: dict[str, torch.Tensor], *, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our consolidated (TP=1, megatron-core names) weights -> the transformers architecture's names."""
    h, nh = m.hidden_size, m.num_heads
    ng, hd = m.num_query_groups or nh, h // nh
    ffn = m.ffn_hidden_size or 4 * h
    out: dict[str, torch.Tensor] = {}

    def get(name, shape=None):
        t = w.get(name)
        if t is None:  # no bias parameters when model.bias=false: the architecture's biases are zero
            return torch.zeros(shape) if shape is not None else None
        return t

    def qkv_split(t):
        return split_qkv(t, nh, ng)

    emb = w["embedding.word_embeddings.weight"][:vocab_size]
    head = emb if m.tie_embeddings else w["output_layer.weight"][:vocab_size]
    for i in range(m.num_layers):
        src = f"decoder.layers.{i}."
        ln1 = (w[src + "input_layernorm.weight"], w.get(src + "input_layernorm.bias"))
        ln2 = (w[src + "pre_mlp_layernorm.weight"], w.get(src + "pre_mlp_layernorm.bias"))
        qkv_w, qkv_b = w[src + "self_attention.linear_qkv.weight"], get(src + "self_attention.linear_qkv.bias", [h + 2 * ng * hd])
        proj_w, proj_b = w[src + "self_attention.linear_proj.weight"], get(src + "self_attention.linear_proj.bias", [h])
        dense_mlp = src + "mlp.linear_fc1.weight" in w
        if dense_mlp:
            fc1_w, fc1_b = w[src + "mlp.linear_fc1.weight"], get(src + "mlp.linear_fc1.bias", [ffn])
            fc2_w, fc2_b = w[src + "mlp.linear_fc2.weight"], get(src + "mlp.linear_fc2.bias", [h])
        if arch in ("llama", "mixtral", "qwen2_moe"):  # Llama's attention and norms in all three
            dst = f"model.layers.{i}."
            out[dst + "input_layernorm.weight"], out[dst + "post_attention_layernorm.weight"] = ln1[0], ln2[0]
            for proj, t in zip("qkv", qkv_split(qkv_w)):
                out[dst + f"self_attn.{proj}_proj.weight"] = t
            out[dst + "self_attn.o_proj.weight"] = proj_w
            if m.bias:  # refused for the MoE architectures
                for proj, t in zip("qkv", qkv_split(qkv_b)):
                    out[dst + f"self_attn.{proj}_proj.bias"] = t
                out[dst + "self_attn.o_proj.bias"] = proj_b
                out[dst + "mlp.gate_proj.bias"], out[dst + "mlp.up_proj.bias"] = fc1_b.chunk(2, dim=0)
                out[dst + "mlp.down_proj.bias"] = fc2_b
        if arch == "qwen2_moe":
            # the names of Qwen1.5-MoE's published checkpoints (transformers fuses the experts on load)
            mlps = {dst + "mlp.": src + "mlp."} if dense_mlp else {
                **{f"{dst}mlp.experts.{j}.": f"{src}mlp.experts.local_experts.{j}." for j in range(m.moe.num_experts)},
                dst + "mlp.shared_expert.": src + "mlp.shared_experts."}
            for to, frm in mlps.items():
                out[to + "gate_proj.weight"], out[to + "up_proj.weight"] = w[frm + "linear_fc1.weight"].chunk(2, dim=0)
                out[to + "down_proj.weight"] = w[frm + "linear_fc2.weight"]
            if not dense_mlp:
                out[dst + "mlp.gate.weight"] = w[src + "mlp.router.weight"]
                out[dst + "mlp.shared_expert_gate.weight"] = w[src + "mlp.shared_experts.gate_weight"]
        elif arch == "mixtral":
            # the names of Mixtral's published checkpoints (transformers fuses the experts on load)
            moe = dst + "block_sparse_moe."
            out[moe + "gate.weight"] = w[src + "mlp.router.weight"]
            for j in range(m.moe.num_experts):
                expert = f"{src}mlp.experts.local_experts.{j}."
                # w1: gate, w3: up (megatron's fc1 is [gate; up]), w2: down
                out[moe + f"experts.{j}.w1.weight"], out[moe + f"experts.{j}.w3.weight"] = \
                    w[expert + "linear_fc1.weight"].chunk(2, dim=0)
                out[moe + f"experts.{j}.w2.weight"] = w[expert + "linear_fc2.weight"]
        elif arch == "llama":
            # megatron's gated fc1 is [gate; up]: act(first half) * second half
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = fc1_w.chunk(2, dim=0)
            out[dst + "mlp.down_proj.weight"] = fc2_w
        elif arch == "gpt_neox":
            # GPT-NeoX's query_key_value is laid out per head as [q, k, v]: megatron's MHA layout as it is
            dst = f"gpt_neox.layers.{i}."
            out.update({dst + "input_layernorm.weight": ln1[0], dst + "input_layernorm.bias": ln1[1],
                        dst + "post_attention_layernorm.weight": ln2[0], dst + "post_attention_layernorm.bias": ln2[1],
                        dst + "attention.query_key_value.weight": qkv_w, dst + "attention.query_key_value.bias": qkv_b,
                        dst + "attention.dense.weight": proj_w, dst + "attention.dense.bias": proj_b,
                        dst + "mlp.dense_h_to_4h.weight": fc1_w, dst + "mlp.dense_h_to_4h.bias": fc1_b,
                        dst + "mlp.dense_4h_to_h.weight": fc2_w, dst + "mlp.dense_4h_to_h.bias": fc2_b})
        else:
            # GPT-2: c_attn is [all q; all k; all v], and its Conv1D weights are stored (in, out)
            dst = f"transformer.h.{i}."
            q, k, v = qkv_split(qkv_w)
            qb, kb, vb = qkv_split(qkv_b)
            out.update({dst + "ln_1.weight": ln1[0], dst + "ln_1.bias": ln1[1],
                        dst + "ln_2.weight": ln2[0], dst + "ln_2.bias": ln2[1],
                        dst + "attn.c_attn.weight": torch.cat([q, k, v]).T, dst + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
                        dst + "attn.c_proj.weight": proj_w.T, dst + "attn.c_proj.bias": proj_b,
                        dst + "mlp.c_fc.weight": fc1_w.T, dst + "mlp.c_fc.bias": fc1_b,
                        dst + "mlp.c_proj.weight": fc2_w.T, dst + "mlp.c_proj.bias": fc2_b})
    final = (w["decoder.final_layernorm.weight"], w.get("decoder.final_layernorm.bias"))
    if arch in ("llama", "mixtral", "qwen2_moe"):
        out.update({"model.embed_tokens.weight": emb, "model.norm.weight": final[0]})
        head_name = "lm_head.weight"
    elif arch == "gpt_neox":
        out.update({"gpt_neox.embed_in.weight": emb, "gpt_neox.final_layer_norm.weight": final[0],
                    "gpt_neox.final_layer_norm.bias": final[1]})
        head_name = "embed_out.weight"
    else:
        out.update({"transformer.wte.weight": emb, "transformer.wpe.weight": w["embedding.position_embeddings.weight"],
                    "transformer.ln_f.weight": final[0], "transformer.ln_f.bias": final[1]})
        head_name = "lm_head.weight"
    if "classifier.weight" in w:  # a classification head: *ForSequenceClassification's score, no LM head
        out["score.weight"] = w["classifier.weight"]
    elif not m.tie_embeddings:  # tied: transformers ties the head to the input embedding on load
        out[head_name] = head
    return out


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
# megatron linear -> the transformers modules its rows become, per architecture (format=peft)
PEFT_MODULES = {
    "llama": {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "self_attention.linear_proj": ("self_attn.o_proj",),
              "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"), "mlp.linear_fc2": ("mlp.down_proj",)},
    "gpt_neox": {"self_attention.linear_qkv": ("attention.query_key_value",),
                 "self_attention.linear_proj": ("attention.dense",),
                 "mlp.linear_fc1": ("mlp.dense_h_to_4h",), "mlp.linear_fc2": ("mlp.dense_4h_to_h",)},
}
PEFT_MODULES["mixtral"] = PEFT_MODULES["llama"]  # attention only: experts get no adapters
PEFT_LAYERS = {"llama": "model.layers", "mixtral": "model.layers", "gpt_neox": "gpt_neox.layers"}


def peft_adapter(m, arch: str, weights: dict[str, torch.Tensor], lora) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA run's adapter tensors (our names) -> (PEFT's adapter_model tensors, adapter_config.json)."""
    if arch not in PEFT_MODULES:
        raise ExportError(f"format=peft: {arch} models are not supported (PEFT adapters are written for "
                          f"{sorted(PEFT_MODULES)}); use format=merged")
    nh, ng = m.num_heads, m.num_query_groups or m.num_heads
    out, targets = {}, set()
    for name, a in weights.items():
        if not name.endswith(".lora_A"):
            continue
        linear = name[:-len(".lora_A")]
        layer, path = linear.split(".", 3)[2], linear.split(".", 3)[3]
        b = weights[linear + ".lora_B"]
        modules = PEFT_MODULES[arch][path]
        if len(modules) == 3:  # B's rows are the fused QKV's
            parts = list(split_qkv(b, nh, ng))
        elif len(modules) == 2:  # gated fc1: [gate; up]
            parts = list(b.chunk(2, dim=0))
        else:
            parts = [b]
        for module, part in zip(modules, parts):
            key = f"base_model.model.{PEFT_LAYERS[arch]}.{layer}.{module}"
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
