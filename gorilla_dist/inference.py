"""Using a trained model: sampling, and a checkpoint's model loaded into this one process.

`sample` runs after training on all ranks at once (tensor-parallel logits are gathered, and every rank
draws from an identically seeded generator, so all ranks agree on every token), and in the generate
tool on one process. `checkpoint_model` / `inference_model` load a checkpoint written by any layout
into a single-process (TP=1) model, for generate, evaluate and the tests.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch


@torch.no_grad()
def sample(model, tokenizer, prompt: str, *, max_new_tokens: int, seq_length: int, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0) -> str:
    """Autoregressive sampling (no KV cache: the context is cropped to seq_length and re-run)."""
    from megatron.core import parallel_state as ps

    from gorilla_dist.parallel import tp_all_gather

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.long, device=device)[None]  # (1, t)
    for _ in range(max_new_tokens):
        ctx = ids[:, -seq_length:]
        pos = torch.arange(ctx.shape[1], device=device).unsqueeze(0)
        logits = model(ctx, pos, None)[:, -1, :]  # (1, vocab / tp)
        if ps.get_tensor_model_parallel_world_size() > 1:  # vocab-parallel logits -> full vocabulary
            logits = torch.cat(tp_all_gather(logits), dim=-1)
        logits = logits[:, :tokenizer.vocab_size].float()  # drop the padding rows of the vocabulary
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return tokenizer.decode(ids[0].tolist())


def checkpoint_model(run_dir: str | os.PathLike, which: str, device):
    """(config, checkpoint directory, fp32 TP=1 model in eval mode with the checkpoint's weights,
    tokenizer). Needs torch.distributed and megatron's parallel state set up with TP=1."""
    from gorilla_dist.checkpoint import checkpoint_weights, load_consolidated, resolve_checkpoint
    from gorilla_dist.config import load_run_config
    from gorilla_dist.data.tokenizer import load_tokenizer
    from gorilla_dist.finetune import apply_finetune
    from gorilla_dist.model import build_model

    ckpt = resolve_checkpoint(run_dir, which)
    cfg = load_run_config(ckpt)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, dtype="fp32", device=device, seed=cfg.run.seed,
                        finetune=cfg.finetune)
    apply_finetune(model, cfg.finetune)  # the run's adapters, if any
    load_consolidated(model, checkpoint_weights(ckpt), str(ckpt))
    return cfg, ckpt, model.eval(), tokenizer


@contextmanager
def inference_model(run_dir: str | os.PathLike, which: str = "latest"):
    """checkpoint_model in this one process (TP=1), whatever layout trained it; torch.distributed is
    set up for it and torn down on exit."""
    from omegaconf import OmegaConf

    from gorilla_dist.config import ParallelConfig
    from gorilla_dist.parallel import init_distributed, teardown
    from gorilla_dist.runtime import single_process_env

    with mock.patch.dict(os.environ, single_process_env()):
        layout = init_distributed(OmegaConf.structured(ParallelConfig))
        try:
            yield checkpoint_model(run_dir, which, layout.device)
        finally:
            teardown()
