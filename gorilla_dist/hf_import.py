"""Starting from a Hugging Face model: `checkpoint.init_from=hf:<transformers directory>`, the inverse of
export (gorilla_dist/export.py): the architectures export writes come back as our model.

    LlamaForCausalLM (also Mistral-shaped: no sliding window)  -> rope + RMSNorm + swiglu (grouped-query too)
    GPTNeoXForCausalLM (sequential residual, full rotary)      -> rope + LayerNorm + gelu, biases
    GPT2LMHeadModel                                            -> learned positions + LayerNorm + gelu, biases
    MixtralForCausalLM (no sliding window, no jitter)          -> the Llama shape with model.moe experts

The launcher reads config.json and sets the architecture's fields of `model` (`model_fields`; the run
keeps its own seq_length, dropout and attention); anything our model does not compute exactly (partial
rotary, parallel residual, rope scaling, biases on only some linears, ...) is refused with the reason.
Training reads the weights (safetensors, sharded or not) and renames and re-lays them out
(`our_weights`). The run's data must be prepared with the model's own tokenizer (tokenizer=<dir>).
This module imports torch only inside the weight conversion: the launcher uses the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from gorilla_dist.errors import ConfigError

PREFIX = "hf:"


def hf_dir(init_from: str | None) -> Path | None:
    """The transformers directory of checkpoint.init_from=hf:<dir> (None for our own checkpoints)."""
    if not init_from or not str(init_from).startswith(PREFIX):
        return None
    return Path(str(init_from)[len(PREFIX):])


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"checkpoint.init_from=hf:{directory}: no config.json there (a transformers model directory, "
                          "as save_pretrained writes it, is expected)")
    return json.loads(path.read_text())


def _refuse(source: str, why: str):
    raise ConfigError(f"checkpoint.init_from=hf:{source}: {why}; our model would compute something else, so it is "
                      "not imported")


def _rope(config: dict, source: str, default: float = 10000.0) -> int:
    """The rotary base: `rope_theta`, or transformers 5's `rope_parameters` (plain rotary only)."""
    params = config.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        _refuse(source, f"rope scaling {config.get('rope_scaling') or params} (only plain rotary positions are built)")
    theta = config.get("rope_theta") or params.get("rope_theta") or config.get("rotary_emb_base") or default
    return int(theta)


def model_fields(config: dict, source: str) -> dict:
    """The architecture fields of our ModelConfig computing exactly what `config` (config.json) does."""
    kind = config.get("model_type")
    if kind in ("llama", "mistral", "mixtral"):
        h, nh = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim") not in (None, h // nh):
            _refuse(source, f"head_dim={config['head_dim']} differs from hidden_size / num_attention_heads = {h // nh}")
        if config.get("sliding_window"):
            _refuse(source, f"sliding_window={config['sliding_window']} (attention over the whole context only)")
        if config.get("hidden_act", "silu") != "silu":
            _refuse(source, f"hidden_act={config['hidden_act']} (swiglu with silu only)")
        bias = bool(config.get("attention_bias", False))
        if bool(config.get("mlp_bias", bias)) != bias:
            _refuse(source, "attention_bias and mlp_bias differ (model.bias applies to every linear)")
        fields = {"num_layers": config["num_hidden_layers"], "hidden_size": h, "num_heads": nh,
                  "num_query_groups": config.get("num_key_value_heads") or nh,
                  "ffn_hidden_size": config["intermediate_size"], "position_embedding": "rope",
                  "rotary_base": _rope(config, source), "normalization": "RMSNorm",
                  "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "activation": "swiglu", "bias": bias,
                  "tie_embeddings": bool(config.get("tie_word_embeddings", False))}
        if kind == "mixtral":
            if config.get("router_jitter_noise"):
                _refuse(source, f"router_jitter_noise={config['router_jitter_noise']}")
            fields["moe"] = {"num_experts": config["num_local_experts"], "topk": config["num_experts_per_tok"],
                             "every": 1, "router": "softmax", "ffn_hidden_size": config["intermediate_size"]}
        return fields
    if kind == "gpt_neox":
        partial = config.get("rotary_pct", (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            _refuse(source, f"rotary_pct={partial} (rotary positions on the whole head only)")
        if config.get("use_parallel_residual", True):
            _refuse(source, "use_parallel_residual=true (Pythia's parallel attention + MLP block; ours is sequential)")
        if config.get("hidden_act", "gelu") != "gelu":
            _refuse(source, f"hidden_act={config['hidden_act']}")
        return {"num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
                "num_heads": config["num_attention_heads"], "num_query_groups": None,
                "ffn_hidden_size": config["intermediate_size"], "position_embedding": "rope",
                "rotary_base": _rope(config, source),
                "normalization": "LayerNorm", "norm_eps": float(config.get("layer_norm_eps", 1e-5)),
                "activation": "gelu", "bias": True, "tie_embeddings": bool(config.get("tie_word_embeddings", False))}
    if kind == "gpt2":
        if config.get("activation_function", "gelu_new") not in ("gelu",):
            _refuse(source, f"activation_function={config.get('activation_function', 'gelu_new')} (exact gelu only; "
                            "GPT-2's published models use the tanh approximation gelu_new)")
        if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx"):
            _refuse(source, "attention scaling other than 1 / sqrt(head_dim)")
        h = config["n_embd"]
        return {"num_layers": config["n_layer"], "hidden_size": h, "num_heads": config["n_head"],
                "num_query_groups": None, "ffn_hidden_size": config.get("n_inner") or 4 * h,
                "position_embedding": "learned_absolute", "normalization": "LayerNorm",
                "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)), "activation": "gelu", "bias": True,
                "tie_embeddings": bool(config.get("tie_word_embeddings", True))}
    _refuse(source, f"model_type={kind!r}; importable: llama, mistral, mixtral, gpt_neox, gpt2")


def max_positions(config: dict) -> int | None:
    """Learned position embeddings (GPT-2) bound the context."""
    return config.get("n_positions") if config.get("model_type") == "gpt2" else None


def read_weights(directory: Path) -> dict:
    """Every tensor of the directory's safetensors files (model.safetensors, or the shards its index lists)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        if not (directory / name).is_file():
            raise ConfigError(f"checkpoint.init_from=hf:{directory}: {name} is missing (safetensors weights expected; "
                              "a pytorch_model.bin can be converted with transformers' save_pretrained)")
        out.update(load_file(str(directory / name)))
    return out


def our_weights(m, config: dict, w: dict, *, vocab_size: int, padded_vocab: int) -> dict:
    """transformers' tensors (`w`) -> our single-process names and layouts (the inverse of export.hf_weights);
    the embedding and output rows of the tokenizer's `vocab_size` ids, padded with zeros to `padded_vocab`
    (rows no token uses)."""
    import torch

    kind = config["model_type"]
    h, nh = m.hidden_size, m.num_heads
    ng, hd = m.num_query_groups or nh, h // nh
    out = {}

    def pad(t):
        if t.shape[0] < vocab_size:
            raise ConfigError(f"checkpoint.init_from=hf: the model has {t.shape[0]} embedding rows, its tokenizer "
                              f"{vocab_size} ids")
        t = t[:vocab_size]
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])

    def fuse(q, k, v):
        # megatron's fused QKV rows: per query group, its nh/ng query heads, then its key and value heads
        q = q.reshape(ng, nh // ng, hd, *q.shape[1:])
        k, v = k.reshape(ng, 1, hd, *k.shape[1:]), v.reshape(ng, 1, hd, *v.shape[1:])
        return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[3:])

    for i in range(m.num_layers):
        dst = f"decoder.layers.{i}."
        if kind in ("llama", "mistral", "mixtral"):
            src = f"model.layers.{i}."
            out[dst + "input_layernorm.weight"] = w[src + "input_layernorm.weight"]
            out[dst + "pre_mlp_layernorm.weight"] = w[src + "post_attention_layernorm.weight"]
            a = src + "self_attn."
            out[dst + "self_attention.linear_qkv.weight"] = fuse(*(w[a + f"{x}_proj.weight"] for x in "qkv"))
            out[dst + "self_attention.linear_proj.weight"] = w[a + "o_proj.weight"]
            if m.bias:
                out[dst + "self_attention.linear_qkv.bias"] = fuse(*(w[a + f"{x}_proj.bias"] for x in "qkv"))
                out[dst + "self_attention.linear_proj.bias"] = w[a + "o_proj.bias"]
            if kind == "mixtral":
                moe = src + "block_sparse_moe."
                out[dst + "mlp.router.weight"] = w[moe + "gate.weight"]
                for j in range(m.moe.num_experts):
                    e, ours = f"{moe}experts.{j}.", f"{dst}mlp.experts.local_experts.{j}."
                    out[ours + "linear_fc1.weight"] = torch.cat([w[e + "w1.weight"], w[e + "w3.weight"]])
                    out[ours + "linear_fc2.weight"] = w[e + "w2.weight"]
            else:
                mlp = src + "mlp."
                out[dst + "mlp.linear_fc1.weight"] = torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]])
                out[dst + "mlp.linear_fc2.weight"] = w[mlp + "down_proj.weight"]
                if m.bias:
                    out[dst + "mlp.linear_fc1.bias"] = torch.cat([w[mlp + "gate_proj.bias"], w[mlp + "up_proj.bias"]])
                    out[dst + "mlp.linear_fc2.bias"] = w[mlp + "down_proj.bias"]
        elif kind == "gpt_neox":
            src = f"gpt_neox.layers.{i}."
            for ours, theirs in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm"),
                                 ("self_attention.linear_qkv", "attention.query_key_value"),
                                 ("self_attention.linear_proj", "attention.dense"), ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
                                 ("mlp.linear_fc2", "mlp.dense_4h_to_h")):
                for p in ("weight", "bias"):  # (NeoX's fused QKV is megatron's MHA layout as it is)
                    out[f"{dst}{ours}.{p}"] = w[f"{src}{theirs}.{p}"]
        else:  # gpt2: Conv1D weights are stored (in, out); c_attn is [all q; all k; all v]
            src = f"transformer.h.{i}."
            qkv_w, qkv_b = w[src + "attn.c_attn.weight"].T, w[src + "attn.c_attn.bias"]
            out[dst + "self_attention.linear_qkv.weight"] = fuse(*qkv_w.chunk(3))
            out[dst + "self_attention.linear_qkv.bias"] = fuse(*qkv_b.chunk(3))
            for ours, theirs, transpose in (("input_layernorm", "ln_1", False), ("pre_mlp_layernorm", "ln_2", False),
                                            ("self_attention.linear_proj", "attn.c_proj", True),
                                            ("mlp.linear_fc1", "mlp.c_fc", True), ("mlp.linear_fc2", "mlp.c_proj", True)):
                out[f"{dst}{ours}.weight"] = w[f"{src}{theirs}.weight"].T if transpose else w[f"{src}{theirs}.weight"]
                out[f"{dst}{ours}.bias"] = w[f"{src}{theirs}.bias"]
    if kind in ("llama", "mistral", "mixtral"):
        emb, final, head = w["model.embed_tokens.weight"], {"weight": w["model.norm.weight"]}, w.get("lm_head.weight")
    elif kind == "gpt_neox":
        emb, head = w["gpt_neox.embed_in.weight"], w.get("embed_out.weight")
        final = {"weight": w["gpt_neox.final_layer_norm.weight"], "bias": w["gpt_neox.final_layer_norm.bias"]}
    else:
        emb, head = w["transformer.wte.weight"], w.get("lm_head.weight")
        final = {"weight": w["transformer.ln_f.weight"], "bias": w["transformer.ln_f.bias"]}
        out["embedding.position_embeddings.weight"] = w["transformer.wpe.weight"][:m.seq_length]
    out["embedding.word_embeddings.weight"] = pad(emb)
    for p, t in final.items():
        out[f"decoder.final_layernorm.{p}"] = t
    if not m.tie_embeddings:
        out["output_layer.weight"] = pad(head)
    return {k: v.float().contiguous() for k, v in out.items()}


def identity(directory: Path) -> dict:
    """What an adapter checkpoint records of a Hugging Face base: its path and the sha256 of its weights."""
    import hashlib

    from gorilla_dist.files import sha256_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    digest = hashlib.sha256("".join(sha256_file(directory / f) for f in files).encode()).hexdigest()
    return {"path": f"{PREFIX}{directory.resolve()}", "sha256": digest}


def converted(directory: Path, m, vocab_size: int, padded_vocab: int) -> dict:
    """The model in `directory` as our single-process weights for model config `m`, a tokenizer of
    `vocab_size` ids and `padded_vocab` embedding rows."""
    return our_weights(m, read_config(directory), read_weights(directory), vocab_size=vocab_size,
                       padded_vocab=padded_vocab)


def check_tokenizer(directory: Path, run_tokenizer: Path) -> None:
    """The run's data was prepared with the model's own tokenizer (the same Hugging Face tokenizer.json)."""
    from gorilla_dist.errors import CheckpointError

    theirs = directory / "tokenizer.json"
    ours = json.loads(run_tokenizer.read_text()) if run_tokenizer.is_file() else {}
    if not theirs.is_file() or ours.get("kind") != "hf" or ours.get("hf") != json.loads(theirs.read_text()):
        raise CheckpointError(f"checkpoint.init_from=hf:{directory}: this run's data was not prepared with the model's "
                              f"tokenizer ({theirs}); prepare it with tokenizer={directory} (or set data.tokenizer="
                              f"{directory}), or the token ids would mean other things")
