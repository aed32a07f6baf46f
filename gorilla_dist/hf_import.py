"""Starting from a Hugging Face model: `checkpoint.init_from=hf:<transformers directory>`, the inverse of
export (gorilla_dist/export.py): the architectures export writes come back as our model.

    LlamaForCausalLM (also Mistral-shaped: no sliding window)  -> rope + RMSNorm + swiglu (grouped-query too)
    GPTNeoXForCausalLM (sequential residual, full rotary)      -> rope + LayerNorm + gelu, biases
    GPT2LMHeadModel                                            -> learned positions + LayerNorm + gelu, biases
    MixtralForCausalLM (no sliding window, no jitter)          -> the Llama shape with model.moe experts
    Qwen2MoeForCausalLM (no q/k/v biases)                      -> the Mixtral shape with a gated shared expert

The launcher reads config.json and sets the architecture's fields of `model` (`model_fields`; the run
keeps its own seq_length, dropout and attention); anything our model does not compute exactly (partial
rotary, parallel residual, rope scaling, biases on only some linears, ...) is refused with the reason.
Training reads the weights (safetensors, sharded or not) and renames and re-lays them out
(`our_weights`). Each architecture's names, shapes and checks are its adapter's (gorilla_dist/hf/), which
export reads too. The run's data must be prepared with the model's own tokenizer (tokenizer=<dir>).
This module imports torch only inside the weight conversion: the launcher uses the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from gorilla_dist.errors import ConfigError
from gorilla_dist.hf import adapter_for

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


def model_fields(config: dict, source: str) -> dict:
    """The architecture fields of our ModelConfig computing exactly what `config` (config.json) does (the
    architecture's adapter, gorilla_dist/hf/)."""
    return adapter_for(config, source).fields(config, source)


def max_positions(config: dict) -> int | None:
    """Learned position embeddings (GPT-2) bound the context."""
    return adapter_for(config, "").max_positions(config)


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
    """transformers' tensors (`w`) -> our single-process names and layouts, through the architecture's adapter
    (the inverse of export's)."""
    return adapter_for(config, "").from_hf(m, w, vocab_size=vocab_size, padded_vocab=padded_vocab)


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
